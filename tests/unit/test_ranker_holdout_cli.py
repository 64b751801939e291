"""bench/ranker_holdout.py: a variant's options are checked before any data is read."""

from __future__ import annotations

import pytest

from bench.ranker_holdout import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("spec", ["ctx:no_such_ablation", "other:no_context", "no_context"])
def test_an_ablation_that_names_no_variant_or_no_ablation_is_refused(spec: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--variant", "base", "--variant", "ctx", "--ablation", spec])
    msg = str(exc.value)
    assert msg.startswith(f"--ablation {spec!r}: write VARIANT:NAME")
    assert "['base', 'ctx']" in msg and "no_context" in msg and "no_gnn" in msg
