"""intentrec online side: session state, context enrichment, ranking, HTTP ingress."""
