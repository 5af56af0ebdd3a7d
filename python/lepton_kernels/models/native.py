"""lepton's own model file: one .npz holding the architecture as JSON and the weights as arrays.

Everything is a plain array (the architecture is UTF-8 bytes in a uint8
array), so ``np.load(path, allow_pickle=False)`` reads it: loading a model
never runs code from the file.

Layout: ``__lepton_model__`` (the JSON), ``p0, p1, ...`` the parameters in
the order the JSON's ``params`` lists their names, ``a0, a1, ...`` arrays
that appear as node attributes.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .graph import Graph, Node, TensorInfo

FORMAT = "lepton-kernels-model"
VERSION = 1
ARCH_KEY = "__lepton_model__"


def _jsonable(v, arrays):
    if isinstance(v, np.ndarray):
        arrays.append(v)
        return {"__array__": f"a{len(arrays) - 1}"}
    if isinstance(v, dict):
        return {str(k): _jsonable(x, arrays) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, arrays) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.dtype):
        return v.name
    return v


def _from_json(v, data):
    if isinstance(v, dict):
        if set(v) == {"__array__"}:
            return data[v["__array__"]]
        return {k: _from_json(x, data) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x, data) for x in v]
    return v


def save_graph(graph: Graph, path, kind="graph", extra=None, metadata=None):
    arrays = []
    names = list(graph.params)
    arch = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "inputs": [{"name": i.name, "shape": None if i.shape is None else list(i.shape), "dtype": i.dtype.name}
                   for i in graph.inputs],
        "outputs": list(graph.outputs),
        "nodes": [{"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs,
                   "attrs": _jsonable(n.attrs, arrays)} for n in graph.nodes],
        "params": names,
        "metadata": _jsonable({**graph.metadata, **(metadata or {})}, arrays),
    }
    if extra:
        arch.update(extra)
    blob = np.frombuffer(json.dumps(arch).encode("utf-8"), dtype=np.uint8)
    entries = {ARCH_KEY: blob}
    for k, name in enumerate(names):
        entries[f"p{k}"] = np.ascontiguousarray(graph.params[name])
    for k, a in enumerate(arrays):
        entries[f"a{k}"] = a
    for k, v in entries.items():
        if v.dtype.hasobject:
            raise ValueError(f"model: array {k!r} holds Python objects, which this format does not store")
    # A file object: np.savez would append ".npz" to a path without that suffix.
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **entries)
    os.replace(tmp, path)


def is_native(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return ARCH_KEY + ".npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_arch(path):
    """(architecture dict, the file's arrays) of a native model file."""
    with np.load(path, allow_pickle=False) as data:
        if ARCH_KEY not in data.files:
            raise ValueError(f"{path}: not a lepton-kernels model file (no {ARCH_KEY} entry)")
        arch = json.loads(data[ARCH_KEY].tobytes().decode("utf-8"))
        arrays = {k: data[k] for k in data.files if k != ARCH_KEY}
    if arch.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lepton-kernels model file (format {arch.get('format')!r})")
    if int(arch.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: model file version {arch['version']} is newer than this lepton-kernels "
                         f"reads ({VERSION}); upgrade lepton-kernels")
    return arch, arrays


def graph_from_arch(arch, arrays) -> Graph:
    params = {name: arrays[f"p{k}"] for k, name in enumerate(arch["params"])}
    nodes = [Node(n["op"], n["inputs"], n["outputs"], _from_json(n.get("attrs", {}), arrays), n.get("name", ""))
             for n in arch["nodes"]]
    inputs = [TensorInfo(i["name"], None if i["shape"] is None else tuple(i["shape"]), np.dtype(i["dtype"]))
              for i in arch["inputs"]]
    return Graph(nodes, inputs, arch["outputs"], params, metadata=_from_json(arch.get("metadata", {}), arrays))


def load_native(path) -> Graph:
    arch, arrays = read_arch(path)
    return graph_from_arch(arch, arrays)
