"""intentrec offline side: data loading, graph building, GNN model, training, evaluation, artifacts.

Nothing in this package imports Ray Serve or ``actors``; the online side imports from here.
"""
