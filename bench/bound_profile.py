import os, sys, time, subprocess, tempfile, secrets
from pathlib import Path
sys.path.insert(0, "/work/main")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from bench import serve_bench as sb
from bench.loadgen import LoadSpec
import psutil
def main():
    work = Path(tempfile.mkdtemp(prefix="boundprof-"))
    root, art, model = sb.model_or_stand_in(sys.argv[1], work, "profile")
    mix = sb.traffic(art); del art
    args = sb.app_args(root, work, "bound")
    key = secrets.token_urlsafe(32)
    env = {**sb.config_env_vars(), "INTENTREC_API_KEY": key}
    bound = sb.start_bound(args, 8432, work / "bound.log", env, 0)
    url = "http://127.0.0.1:8432"
    try:
        sb.wait_ready(url, 300, bound)
        auth = {"X-API-Key": key}
        sb.seed_sessions(url, mix["seed_batches"], auth)
        gen = sb.LoadGen()
        ep = sys.argv[2] if len(sys.argv) > 2 else "recommendations"
        dur = float(sys.argv[3]) if len(sys.argv) > 3 else 20
        prof = sys.argv[4] if len(sys.argv) > 4 else None
        spec = LoadSpec(url=url + sb.ENDPOINTS[ep], bodies=mix[ep], mode="closed", concurrency=8,
                        duration_s=dur, warmup_s=2, max_requests=100000, headers=auth)
        p = psutil.Process(bound.pid)
        spy = None
        if prof:
            spy = subprocess.Popen(["py-spy", "record", "--gil", "-r", "250", "-d", str(int(dur)), "-o", prof,
                                    "-f", sys.argv[5] if len(sys.argv) > 5 else "flamegraph",
                                    "-p", str(bound.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c0 = sum(p.cpu_times()[:2])
        res = gen.run(spec)
        c1 = sum(p.cpu_times()[:2])
        answered = res["requests"] * (1 + 2 / dur)
        print(f"{ep} c=8: {res['throughput']:.1f} req/s, p50 {res['p50_ms']:.1f} ms, errors {res['errors']}, "
              f"cpu {((c1 - c0) * 1e3 / answered):.2f} ms/req")
        if spy: spy.wait()
        gen.close()
    finally:
        bound.terminate(); bound.wait(timeout=30)


if __name__ == '__main__':
    main()
