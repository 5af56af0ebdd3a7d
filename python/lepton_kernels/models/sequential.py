"""Between lk.Graph and lk.Sequential: a plain chain of layers runs as an lk.Sequential when the
package has one; anything else stays a graph."""

from __future__ import annotations

from .graph import Graph


def to_sequential(graph: Graph):
    """`graph` as the faster single-call chain when it is one, else `graph` itself."""
    return graph


def graph_of(model):
    """The lk.Graph that describes `model`, or None for an object that is not a model."""
    if isinstance(model, Graph):
        return model
    return None
