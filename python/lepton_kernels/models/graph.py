"""lk.Graph: a model as a DAG of operators, run by lepton's kernels.

The graph's vocabulary is ONNX's operators at their latest-opset semantics
(loaders translate older forms), plus lepton's own ``Linear`` (``x @ W.T +
b``) and two attributes of ``Conv``: ``activation='relu'`` and ``pool`` (a
max-pool fused into the convolution, run as one pass). Constants (weights)
live in ``params``; values that arrive at run time are the graph's inputs.

When a graph is made it is simplified once: constant subgraphs are
evaluated, Identity and Dropout disappear, batch normalisation after a
convolution is folded into its weights, Gemm and MatMul(+Add) with constant
weights become Linear, ReLU folds into the convolution or linear before it,
and a max-pool folds into the convolution before it. Then every node is
built once (weights packed) into a flat program.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from .ops import NONDETERMINISTIC, OPS, OpError

__all__ = ["Graph", "Node", "TensorInfo", "UnsupportedOperatorError"]


class UnsupportedOperatorError(ValueError):
    """A model uses operators lepton cannot run; ``.ops`` lists them all."""

    def __init__(self, ops, source=""):
        self.ops = sorted(set(ops))
        where = f" in {source}" if source else ""
        super().__init__(f"unsupported operator{'s' if len(self.ops) > 1 else ''}{where}: {', '.join(self.ops)}")


@dataclasses.dataclass
class Node:
    op: str
    inputs: list
    outputs: list
    attrs: dict = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        self.inputs = list(self.inputs)
        while self.inputs and not self.inputs[-1]:
            self.inputs.pop()  # trailing optional inputs left out
        self.outputs = list(self.outputs)
        if not self.name:
            self.name = self.outputs[0] if self.outputs else self.op


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A graph input's name, shape (None for a dimension known only at run time) and dtype."""

    name: str
    shape: tuple | None
    dtype: np.dtype


def _consumers(nodes):
    uses = {}
    for n in nodes:
        for i in n.inputs:
            if i:
                uses.setdefault(i, []).append(n)
    return uses


def _build(node, consts):
    attrs = dict(node.attrs)
    attrs["__outputs__"] = len(node.outputs)
    attrs["__op__"] = node.op
    try:
        return OPS[node.op](attrs, consts)
    except OpError as e:
        raise ValueError(f"node {node.name!r} ({node.op}): {e}") from None


# --------------------------------------------------------------------------- simplification passes

def _fold_constants(nodes, params, keep):
    out = []
    for n in nodes:
        if (n.op not in NONDETERMINISTIC and n.op in OPS and all(not i or i in params for i in n.inputs)
                and not any(o in keep for o in n.outputs if o)):
            consts = [params[i] if i else None for i in n.inputs]
            with np.errstate(all="ignore"):
                res = _build(n, consts)(*consts)
            for name, v in zip(n.outputs, res):
                if name and v is not None:
                    params[name] = np.asarray(v)
            continue
        out.append(n)
    return out


def _remove_identities(nodes, outputs):
    """Identity / Dropout: their consumers read the input directly; an Identity that only renames a
    node's result to a graph output gives that node the output's name."""
    uses = _consumers(nodes)
    for n in nodes:  # a Dropout mask nobody reads is no output at all
        if n.op == "Dropout" and len(n.outputs) > 1 and n.outputs[1] not in outputs and not uses.get(n.outputs[1]):
            n.outputs = n.outputs[:1]
    producers = {o: n for n in nodes for o in n.outputs if o}
    rename = {}
    drop = set()
    for n in nodes:
        if n.op not in ("Identity", "Dropout") or len(n.outputs) != 1:
            continue
        src, dst = n.inputs[0], n.outputs[0]
        if dst not in outputs:
            rename[dst] = src
            drop.add(id(n))
        elif src in producers and src not in outputs and len(uses.get(src, ())) == 1:
            p = producers[src]
            p.outputs = [dst if o == src else o for o in p.outputs]
            drop.add(id(n))
    out = []
    for n in nodes:
        if id(n) in drop:
            continue
        n.inputs = [_follow(rename, i) for i in n.inputs]
        out.append(n)
    return out


def _follow(rename, name):
    while name in rename:
        name = rename[name]
    return name


def _single_use(name, uses, outputs):
    return name not in outputs and len(uses.get(name, ())) == 1


def _fold_batch_norm(nodes, params, outputs):
    uses = _consumers(nodes)
    drop = set()
    for n in nodes:
        if n.op != "Conv" or len(n.inputs) < 2 or n.inputs[1] not in params or n.attrs.get("pool"):
            continue
        if len(n.inputs) > 2 and n.inputs[2] not in params:
            continue
        if not _single_use(n.outputs[0], uses, outputs):
            continue
        bn = uses[n.outputs[0]][0]
        if (bn.op != "BatchNormalization" or bn.inputs[0] != n.outputs[0] or len(bn.outputs) > 1
                or any(i not in params for i in bn.inputs[1:5]) or int(bn.attrs.get("training_mode", 0))):
            continue
        w = params[n.inputs[1]]
        scale, shift, mean, var = (params[i].astype(np.float64) for i in bn.inputs[1:5])
        a = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        b = params[n.inputs[2]].astype(np.float64) if len(n.inputs) > 2 else np.zeros(w.shape[0])
        wname, bname = n.outputs[0] + "::weight", n.outputs[0] + "::bias"
        params[wname] = (w.astype(np.float64) * a.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        params[bname] = ((b - mean) * a + shift).astype(w.dtype)
        n.inputs = [n.inputs[0], wname, bname]
        n.outputs = list(bn.outputs)
        drop.add(id(bn))
    return [n for n in nodes if id(n) not in drop]


def _shape_expr(name, producers, params, shapes):
    """The value `name` (a 1-D int64 shape) as a list of entries, each an int or ("dim", value, axis), or None
    when it is not known at load time. Follows Shape / Gather / Unsqueeze / Concat / Cast chains."""
    if name in params:
        v = params[name]
        return [int(a) for a in v.reshape(-1)] if v.dtype.kind in "iu" and v.ndim <= 1 else None
    n = producers.get(name)
    if n is None:
        return None
    if n.op == "Shape":
        src = n.inputs[0]
        rank = len(shapes[src]) if src in shapes else None
        if rank is None:
            return None
        dims = [("dim", src, i) for i in range(rank)]
        known = shapes[src]
        dims = [known[i] if isinstance(known[i], int) else d for i, d in enumerate(dims)]
        return dims[n.attrs.get("start", 0):n.attrs.get("end")]
    if n.op == "Cast":
        return _shape_expr(n.inputs[0], producers, params, shapes)
    if n.op == "Gather" and int(n.attrs.get("axis", 0)) == 0 and n.inputs[1] in params:
        src = _shape_expr(n.inputs[0], producers, params, shapes)
        idx = params[n.inputs[1]]
        if src is None or idx.ndim > 1:
            return None
        return [src[int(i)] for i in idx.reshape(-1)]
    if n.op == "Unsqueeze" and len(n.inputs) > 1 and n.inputs[1] in params:
        src = _shape_expr(n.inputs[0], producers, params, shapes)
        return src if src is not None and len(src) == 1 else None
    if n.op == "Concat" and int(n.attrs.get("axis", 0)) in (0, -1):
        parts = [_shape_expr(i, producers, params, shapes) for i in n.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    return None


def _resolve_reshapes(nodes, params, shapes):
    """Reshape targets computed from the input's own shape (``x.view(x.size(0), -1)``) become constants
    (0 copies a dimension), and Reshape to (batch, -1) becomes Flatten(axis=1)."""
    producers = {o: n for n in nodes for o in n.outputs if o}
    for n in nodes:
        if n.op != "Reshape" or len(n.inputs) < 2 or int(n.attrs.get("allowzero", 0)):
            continue
        if n.inputs[1] not in params:
            expr = _shape_expr(n.inputs[1], producers, params, shapes)
            if expr is None:
                continue
            target = []
            for pos, e in enumerate(expr):
                if isinstance(e, int):
                    target.append(e)
                elif e[1] == n.inputs[0] and e[2] == pos:
                    target.append(0)
                else:
                    break
            else:
                cname = n.outputs[0] + "::shape"
                params[cname] = np.asarray(target, np.int64)
                n.inputs = [n.inputs[0], cname]
        if n.inputs[1] not in params:
            continue
        target = [int(v) for v in params[n.inputs[1]].reshape(-1)]
        src = shapes.get(n.inputs[0])
        flat = target == [0, -1]
        if not flat and src is not None and len(target) == 2 and all(isinstance(d, int) for d in src[1:]):
            rest = int(np.prod(src[1:], dtype=np.int64))
            flat = target in ([-1, rest], [0, rest]) or (isinstance(src[0], int) and target in ([src[0], -1],
                                                                                               [src[0], rest]))
        if flat:
            n.op, n.attrs, n.inputs = "Flatten", {"axis": 1}, [n.inputs[0]]


def _bias_vector(c, n):
    """`c` as an (n,) bias if it broadcasts along the last axis only, else None."""
    if c.size == 1:
        return np.full(n, c.reshape(-1)[0], c.dtype)
    if c.ndim == 1 and c.shape[0] == n:
        return c
    if c.ndim == 2 and c.shape == (1, n):
        return c.reshape(n)
    return None


def _to_linear(nodes, params, outputs):
    uses = _consumers(nodes)
    drop = set()
    for n in nodes:
        if n.op == "Gemm" and len(n.inputs) >= 2 and n.inputs[1] in params and not int(n.attrs.get("transA", 0)):
            B = params[n.inputs[1]]
            if B.ndim != 2 or B.dtype.kind != "f":
                continue
            alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
            W = B if int(n.attrs.get("transB", 0)) else B.T
            bias = None
            if len(n.inputs) > 2:
                if n.inputs[2] not in params:
                    continue
                bias = _bias_vector(params[n.inputs[2]], W.shape[0])
                if bias is None:
                    continue
                bias = (bias.astype(np.float64) * beta).astype(B.dtype)
            wname = n.outputs[0] + "::weight"
            params[wname] = np.ascontiguousarray((W.astype(np.float64) * alpha).astype(B.dtype)
                                                 if alpha != 1.0 else W)
            n.op, n.attrs, n.inputs = "Linear", {}, [n.inputs[0], wname]
            if bias is not None:
                params[wname[:-6] + "bias"] = bias
                n.inputs.append(wname[:-6] + "bias")
        elif n.op == "MatMul" and n.inputs[1] in params:
            B = params[n.inputs[1]]
            if B.ndim != 2 or B.dtype.kind != "f":
                continue
            wname = n.outputs[0] + "::weight"
            params[wname] = np.ascontiguousarray(B.T)
            n.op, n.attrs, n.inputs = "Linear", {}, [n.inputs[0], wname]
            if _single_use(n.outputs[0], uses, outputs):
                add = uses[n.outputs[0]][0]
                if add.op == "Add":
                    other = [i for i in add.inputs if i != n.outputs[0]]
                    if len(other) == 1 and other[0] in params and params[other[0]].ndim <= 1 and \
                            params[other[0]].dtype == B.dtype:
                        bias = _bias_vector(params[other[0]], B.shape[1])
                        if bias is not None:
                            params[wname[:-6] + "bias"] = bias
                            n.inputs.append(wname[:-6] + "bias")
                            n.outputs = list(add.outputs)
                            drop.add(id(add))
    return [n for n in nodes if id(n) not in drop]


def _fuse_relu(nodes, outputs):
    uses = _consumers(nodes)
    drop = set()
    for n in nodes:
        if n.op in ("Conv", "Linear") and not n.attrs.get("activation") and not n.attrs.get("pool") \
                and _single_use(n.outputs[0], uses, outputs):
            r = uses[n.outputs[0]][0]
            if r.op == "Relu":
                n.attrs = dict(n.attrs, activation="relu")
                n.outputs = list(r.outputs)
                drop.add(id(r))
    return [n for n in nodes if id(n) not in drop]


def _fuse_max_pool(nodes, params, outputs):
    uses = _consumers(nodes)
    drop = set()
    for n in nodes:
        if (n.op != "Conv" or n.attrs.get("pool") or len(n.inputs) < 2 or n.inputs[1] not in params
                or params[n.inputs[1]].ndim != 4 or not _single_use(n.outputs[0], uses, outputs)):
            continue
        p = uses[n.outputs[0]][0]
        a = p.attrs
        if p.op != "MaxPool" or len(p.outputs) > 1 and p.outputs[1] or a.get("auto_pad", "NOTSET") not in (
                "NOTSET", "", "VALID") or int(a.get("storage_order", 0)):
            continue
        k = [int(v) for v in a["kernel_shape"]]
        if len(k) != 2:
            continue
        pads = [0] * 4 if a.get("auto_pad") == "VALID" else [int(v) for v in a.get("pads", [0] * 4)]
        if pads[0] != pads[2] or pads[1] != pads[3] or 2 * pads[0] > k[0] or 2 * pads[1] > k[1]:
            continue
        n.attrs = dict(n.attrs, pool={
            "kernel_shape": k, "strides": [int(v) for v in a.get("strides", [1, 1])], "pads": pads[:2],
            "dilations": [int(v) for v in a.get("dilations", [1, 1])], "ceil_mode": int(a.get("ceil_mode", 0))})
        n.outputs = [p.outputs[0]]
        drop.add(id(p))
    return [n for n in nodes if id(n) not in drop]


def _prune(nodes, params, outputs):
    live = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in live for o in n.outputs if o):
            keep.append(n)
            live.update(i for i in n.inputs if i)
    for name in list(params):
        if name not in live:
            del params[name]
    return keep[::-1]


def simplify(nodes, params, inputs, outputs, shapes=None):
    """The graph's simplification passes, in order (see the module's docstring). `shapes` maps value
    names to what is known of their shapes (ints, None for unknown dimensions)."""
    outs = set(outputs)
    nodes = _fold_constants(nodes, params, outs | set(inputs))
    _resolve_reshapes(nodes, params, shapes or {})
    nodes = _remove_identities(nodes, outs)
    nodes = _fold_batch_norm(nodes, params, outs)
    nodes = _to_linear(nodes, params, outs)
    nodes = _fuse_relu(nodes, outs)
    nodes = _fuse_max_pool(nodes, params, outs)
    return _prune(nodes, params, outs)


def _toposort(nodes, available):
    ready = set(available)
    pending = list(nodes)
    order = []
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in ready for i in n.inputs):
                order.append(n)
                ready.update(o for o in n.outputs if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.inputs if i and i not in ready
                              and not any(i in m.outputs for m in rest)})
            raise ValueError(f"graph: values {missing} are used but neither inputs, constants nor produced "
                             f"by any node" if missing else "graph: the nodes contain a cycle")
        pending = rest
    return order


# --------------------------------------------------------------------------- the executable graph

class Graph:
    """A model as a graph of operators; ``graph(x)`` runs it on NumPy arrays.

    ``Graph(nodes, inputs, outputs, params)``: `nodes` a list of :class:`Node`,
    `inputs` a list of :class:`TensorInfo` (or names), `outputs` the names of
    the results, `params` the constant arrays by name. ``metadata`` holds
    free-form facts about the model (``layout`` of the input, class names,
    normalisation, where it came from). Models from ``lk.load_model`` are
    graphs, unless they are plain chains that an ``lk.Sequential`` runs.

    Calling the graph with positional arrays (in input order) or keyword
    arrays (by input name) returns the output, or a tuple when there are
    several. Inputs are converted to the dtype the model declares.
    """

    def __init__(self, nodes, inputs, outputs, params=None, *, metadata=None, simplify_graph=True,
                 value_shapes=None):
        self.inputs = [i if isinstance(i, TensorInfo) else TensorInfo(str(i), None, np.dtype(np.float32))
                       for i in inputs]
        self.outputs = [str(o) for o in outputs]
        self.metadata = dict(metadata or {})
        params = {k: np.asarray(v) for k, v in (params or {}).items()}
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"inputs: duplicate names in {names}")
        unknown = sorted({n.op for n in nodes if n.op not in OPS})
        if unknown:
            raise UnsupportedOperatorError(unknown)
        nodes = [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name) for n in nodes]
        nodes = _toposort(nodes, set(names) | set(params))
        if simplify_graph:
            shapes = {i.name: i.shape for i in self.inputs if i.shape is not None}
            shapes.update(value_shapes or {})
            nodes = simplify(nodes, params, names, self.outputs, shapes)
        for o in self.outputs:
            if o not in params and o not in names and not any(o in n.outputs for n in nodes):
                raise ValueError(f"outputs: {o!r} is produced by no node")
        self.nodes = nodes
        self.params = params
        self._compile()

    # -- building the program
    def _compile(self):
        slots = {}

        def slot(name):
            if name not in slots:
                slots[name] = len(slots)
            return slots[name]

        init = {}
        for name, v in self.params.items():
            init[slot(name)] = v
        self._input_slots = [slot(i.name) for i in self.inputs]
        program = []
        for n in self.nodes:
            consts = [self.params.get(i) if i else None for i in n.inputs]
            run = _build(n, consts)
            program.append((run, tuple(slot(i) if i else -1 for i in n.inputs),
                            tuple(slot(o) if o else -1 for o in n.outputs), n))
        self._output_slots = [slot(o) for o in self.outputs]
        # Free each intermediate value after its last use.
        keep = set(init) | set(self._output_slots)
        last = {}
        for step, (_, ins, _, _) in enumerate(program):
            for s in ins:
                if s >= 0 and s not in keep:
                    last[s] = step
        frees = [[] for _ in program]
        for s, step in last.items():
            frees[step].append(s)
        self._program = [(run, ins, outs, n, tuple(frees[k])) for k, (run, ins, outs, n) in enumerate(program)]
        self._init = [None] * len(slots)
        for s, v in init.items():
            self._init[s] = v

    # -- running
    def _feed(self, args, kwargs):
        if not kwargs and len(args) == len(self.inputs):
            values = list(self._init)
            for info, s, x in zip(self.inputs, self._input_slots, args):
                values[s] = _check_input(x, info)
            return values
        if len(args) > len(self.inputs):
            raise TypeError(f"the model takes {len(self.inputs)} input(s), got {len(args)}")
        feeds = dict(zip((i.name for i in self.inputs), args))
        for k, v in kwargs.items():
            if k not in {i.name for i in self.inputs}:
                raise TypeError(f"{k}: not an input of the model (inputs: {[i.name for i in self.inputs]})")
            if k in feeds:
                raise TypeError(f"{k}: given twice")
            feeds[k] = v
        values = list(self._init)
        for info, s in zip(self.inputs, self._input_slots):
            if info.name not in feeds:
                raise TypeError(f"{info.name}: missing input")
            values[s] = _check_input(feeds[info.name], info)
        return values

    def run(self, *args, **kwargs) -> dict[str, np.ndarray]:
        """Run the graph; the outputs by name."""
        values = self._feed(args, kwargs)
        # IEEE semantics, as in every runtime: sqrt(-1) is NaN, exp(1000) is inf, without a warning.
        with np.errstate(all="ignore"):
            for run, ins, outs, node, frees in self._program:
                try:
                    res = run(*[values[s] if s >= 0 else None for s in ins])
                except (OpError, ValueError, TypeError) as e:
                    # Which node of the model failed, and why (e.g. a shape the model does not accept).
                    kind = TypeError if isinstance(e, TypeError) else ValueError
                    raise kind(f"node {node.name!r} ({node.op}): {e}") from e
                for s, v in zip(outs, res):
                    if s >= 0:
                        values[s] = v
                for s in frees:
                    values[s] = None
        return {o: values[s] for o, s in zip(self.outputs, self._output_slots)}

    def __call__(self, *args, **kwargs):
        res = self.run(*args, **kwargs)
        return res[self.outputs[0]] if len(self.outputs) == 1 else tuple(res[o] for o in self.outputs)

    # -- description
    @property
    def input_shape(self) -> tuple | None:
        """The first input's shape (None for a dimension known only at run time), or None if unknown."""
        return self.inputs[0].shape if self.inputs else None

    @property
    def input_dtype(self) -> np.dtype:
        return self.inputs[0].dtype

    @property
    def layout(self) -> str:
        """'nchw' or 'nhwc': how the first input holds an image (Keras models take NHWC)."""
        return self.metadata.get("layout", "nchw")

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def describe(self) -> str:
        """One line per input, node and output: what runs, in order."""
        lines = [f"lk.Graph: {len(self.inputs)} input(s), {len(self.outputs)} output(s), {len(self.nodes)} node(s), "
                 f"{self.num_parameters():,} parameters"]
        if self.metadata.get("source"):
            lines[0] += f" (from {self.metadata['source']})"
        for i in self.inputs:
            shape = "?" if i.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in i.shape) + "]"
            lines.append(f"  input  {i.name}: {i.dtype} {shape} {self.layout.upper() if i is self.inputs[0] else ''}"
                         .rstrip())
        for n in self.nodes:
            lines.append(f"  {_node_summary(n, self.params):<60} -> {', '.join(o for o in n.outputs if o)}")
        lines.append(f"  output {', '.join(self.outputs)}")
        return "\n".join(lines)

    def __reduce__(self):  # the compiled program is rebuilt; the graph is already simplified
        return _restore, (self.nodes, self.inputs, self.outputs, self.params, self.metadata)

    def __repr__(self):
        return f"<lk.Graph: {len(self.nodes)} nodes, inputs {[i.name for i in self.inputs]}, outputs {self.outputs}>"


def _restore(nodes, inputs, outputs, params, metadata):
    return Graph(nodes, inputs, outputs, params, metadata=metadata, simplify_graph=False)


def _check_input(x, info):
    if type(x) is np.ndarray and x.dtype == info.dtype and info.shape is not None and x.ndim == len(info.shape) \
            and all(w is None or w == g for w, g in zip(info.shape, x.shape)):
        return x
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, int, float, np.generic)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{info.name}: expected a numpy.ndarray, got {type(x).__name__}")
    if info.shape is not None:
        if x.ndim != len(info.shape):
            raise ValueError(f"{info.name}: expected {len(info.shape)} dimensions "
                             f"{_shape_str(info.shape)}, got shape {x.shape}")
        for d, (want, got) in enumerate(zip(info.shape, x.shape)):
            if isinstance(want, int) and want != got:
                raise ValueError(f"{info.name}: expected shape {_shape_str(info.shape)}, got {x.shape} "
                                 f"(dimension {d})")
    if x.dtype != info.dtype:
        if x.dtype.kind not in "fiub" or (info.dtype.kind == "f" and x.dtype.kind not in "fiu"):
            raise TypeError(f"{info.name}: expected dtype {info.dtype}, got {x.dtype}")
        x = x.astype(info.dtype)
    return x


def _shape_str(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _node_summary(n, params) -> str:
    a = n.attrs
    s = f"{n.op:<18}"
    if n.op == "Conv" and len(n.inputs) > 1 and n.inputs[1] in params:
        w = params[n.inputs[1]]
        g = int(a.get("group", 1))
        s += f"{w.shape[1] * g}->{w.shape[0]} k{'x'.join(map(str, w.shape[2:]))}"
        if any(int(v) != 1 for v in a.get("strides", [])):
            s += f" s{'x'.join(map(str, a['strides']))}"
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
            s += f" {a['auto_pad']}"
        elif any(int(v) for v in a.get("pads", [])):
            s += f" p{list(a['pads'])}"
        if g != 1:
            s += f" g{g}"
        if a.get("activation"):
            s += f" +{a['activation']}"
        if a.get("pool"):
            s += f" +maxpool {'x'.join(map(str, a['pool']['kernel_shape']))}"
    elif n.op == "Linear" and n.inputs[1] in params:
        w = params[n.inputs[1]]
        s += f"{w.shape[1]}->{w.shape[0]}" + (" +bias" if len(n.inputs) > 2 else "")
        if a.get("activation"):
            s += f" +{a['activation']}"
    else:
        shown = {k: v for k, v in a.items() if not isinstance(v, np.ndarray) and not k.startswith("__")}
        if shown:
            s += " " + ", ".join(f"{k}={v}" for k, v in shown.items())
    return s

