"""(IA)³ layers: ``IA3Linear`` wraps a frozen linear layer and scales it by learned vectors.

::

    attention target (k_proj, v_proj)         feed-forward target (down_proj)

          x [..., in]                                x [..., in]
             │                                          │
       base_layer(x)   frozen W, b                 x ⊙ ia3_l      ia3_l: [1, in]
             │                                          │
        ⊙ ia3_l        ia3_l: [out, 1]              base_layer     frozen W, b
             │                                          │
             ▼  y = (W x + b) ⊙ l                       ▼  y = W (x ⊙ l) + b

The vectors start at ones, so the output starts equal to the base model's (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").
This is PEFT's ``peft.tuners.ia3.layer.Linear``, operation for operation, so fp32 outputs
match it exactly.

A layer holds any number of adapters by name; one (``active_adapter``) or none is used, or,
for serving, one per row of a batch (``set_adapter_rows``).
``merge`` scales the base weight (rows for an attention target, columns for a feed-forward
one; and the bias of an attention target), ``merged`` makes it idempotent; ``unmerge``
divides again (PEFT does the same), or restores a copy taken at merge time when a vector has
a zero entry that division cannot undo.
"""

import re

import torch
from ftengine.errors import AdapterError
from torch import nn


def vector_shape(layer, feedforward):
    """The shape of an (IA)³ vector for ``layer`` (a linear layer or its wrapper): ``(1, in)``
    for a feed-forward target, ``(out, 1)`` otherwise, as PEFT stores them."""
    return (1, layer.in_features) if feedforward else (layer.out_features, 1)


class IA3Linear(nn.Module):
    """A frozen linear layer plus named (IA)³ vectors (see the module docstring).

    Parameter names are ``ia3_l.<adapter>``: PEFT's on-disk name ``ia3_l`` with the adapter
    name added, as in PEFT's own modules.
    """

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.ia3_l = nn.ParameterDict()
        self.feedforward = {}  # adapter name -> scales the input (True) or the output (False)
        self.active_adapter = None
        self.rows = None  # (vectors [rows, dim], whether they scale the input), from set_adapter_rows
        self.merged = False
        self._saved_base = None  # (weight, bias) copies when division cannot unmerge
        self.train(base_layer.training)

    def add_adapter(self, name, *, feedforward):
        """Create adapter ``name`` (inactive), its vector set to ones."""
        if name in self.ia3_l:
            raise AdapterError(f"an adapter named '{name}' is already loaded; load this one under another name")
        device = self.base_layer.weight.device
        self.ia3_l[name] = nn.Parameter(torch.ones(vector_shape(self, feedforward), device=device, dtype=torch.float32))
        self.feedforward[name] = feedforward

    def set_active_adapter(self, name):
        """Use adapter ``name`` (``None``, or a name this layer lacks: the base layer alone)."""
        name = name if name in self.ia3_l else None
        if self.merged and name != self.active_adapter:
            self.unmerge()
        self.active_adapter = name

    def delete_adapter(self, name):
        """Remove adapter ``name`` (a no-op for a name the layer lacks)."""
        if name not in self.ia3_l:
            return
        if self.active_adapter == name:
            self.unmerge()
            self.active_adapter = None
        del self.ia3_l[name]
        del self.feedforward[name]

    def set_adapter_rows(self, names):
        """Scale row ``i`` of the next forwards by adapter ``names[i]`` (``None``, or a name this
        layer lacks: the base layer alone); ``names=None``: back to the active adapter."""
        if names is None:
            self.rows = None
            return
        if self.merged:
            raise AdapterError("a merged (IA)³ layer cannot use one adapter per row: unmerge the adapters first")
        kinds = {self.feedforward[n] for n in names if n in self.ia3_l}
        if len(kinds) > 1:
            raise AdapterError("(IA)³ adapters that scale this layer's input and its output cannot share a batch")
        feedforward = kinds.pop() if kinds else False
        ones = torch.ones(vector_shape(self, feedforward), device=self.base_layer.weight.device)
        self.rows = torch.stack([self.ia3_l.get(n, ones).detach().flatten() for n in names]), feedforward

    def forward(self, x):
        if self.rows is not None:
            vectors, feedforward = self.rows
            scaling = vectors.view(len(vectors), *([1] * (x.dim() - 2)), -1)
        elif self.active_adapter is None or self.merged:
            return self.base_layer(x)
        else:
            scaling, feedforward = self.ia3_l[self.active_adapter].flatten(), self.feedforward[self.active_adapter]
        if feedforward:
            return self.base_layer((x.to(scaling.dtype) * scaling).to(x.dtype))
        result = self.base_layer(x)
        return (result * scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Scale the base weight (and an attention target's bias) by the active vector; a no-op
        if merged or inactive."""
        name = self.active_adapter
        if self.merged or name is None:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if getattr(weight, "quant_state", None) is not None:
            raise AdapterError("ia3 cannot merge into a quantised base weight; merge over the full-precision base model")
        vector = self.ia3_l[name]
        if not bool(vector.all()):  # a zero entry: division could not restore the weight
            self._saved_base = (weight.clone(), None if bias is None else bias.clone())
        weight.copy_(weight * vector)
        if bias is not None and not self.feedforward[name]:
            bias.copy_(bias * vector.flatten())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the merged vector out of the base weight again; a no-op if not merged."""
        if not self.merged:
            return
        name = self.active_adapter
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self._saved_base is not None:
            weight.copy_(self._saved_base[0])
            if bias is not None:
                bias.copy_(self._saved_base[1])
        else:
            vector = self.ia3_l[name]
            weight.copy_(weight / vector)
            if bias is not None and not self.feedforward[name]:
                bias.copy_(bias / vector.flatten())
        self.merged, self._saved_base = False, None

    def extra_repr(self):
        adapters = ", ".join(f"{n}: {'input' if self.feedforward[n] else 'output'}" for n in self.ia3_l)
        return f"adapters=[{adapters}], active={self.active_adapter!r}, merged={self.merged}"


# --------------------------------------------------------------------------------------------
# finding, wrapping and unwrapping layers in a model
# --------------------------------------------------------------------------------------------


def ia3_layers(model):
    """``[(path, IA3Linear), ...]`` in module order."""
    return [(path, module) for path, module in model.named_modules() if isinstance(module, IA3Linear)]


def linear_modules(model):
    """Adaptable layers by path: ``nn.Linear`` and ``IA3Linear`` wrappers, not the layers inside."""
    found, wrapper_prefixes = {}, ()
    for path, module in model.named_modules():
        if path.startswith(wrapper_prefixes):
            continue
        if isinstance(module, IA3Linear):
            wrapper_prefixes += (f"{path}.",)
            found[path] = module
        elif isinstance(module, nn.Linear):
            found[path] = module
    return found


def matches(path, patterns):
    """Whether ``target_modules`` selects ``path``, as PEFT decides: a string is a regular
    expression the whole path must match; a list names paths equal to or ending in ``.name``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith(f".{p}") for p in patterns)


def is_feedforward(path, patterns):
    """Whether ``feedforward_modules`` names ``path``. PEFT tests a list with a bare
    ``endswith`` (no dot), and so does this, so both pick the same layers."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path.endswith(p) for p in patterns)


def select_targets(model, target_modules):
    """Paths of the linear layers ``target_modules`` selects (``"all-linear"``: all but the
    output head)."""
    modules = linear_modules(model)
    if target_modules == "all-linear":
        head = model.get_output_embeddings()
        return [p for p, m in modules.items() if m is not head and getattr(m, "base_layer", None) is not head]
    return [p for p in modules if matches(p, target_modules)]


def wrap_linear(model, path):
    """The ``IA3Linear`` at ``path``, wrapping the linear layer there first if needed."""
    module = model.get_submodule(path)
    if isinstance(module, IA3Linear):
        return module
    parent_path, _, child = path.rpartition(".")
    wrapper = IA3Linear(module)
    setattr(model.get_submodule(parent_path), child, wrapper)
    return wrapper


def inject_adapter(model, paths, name, feedforward_modules):
    """Add adapter ``name`` to the linear layers at ``paths`` (wrapping them); return the layers."""
    layers = [wrap_linear(model, path) for path in paths]
    for path, layer in zip(paths, layers):
        layer.add_adapter(name, feedforward=is_feedforward(path, feedforward_modules))
    return layers


def unwrap_merged(model):
    """Replace every ``IA3Linear`` by its base layer; active adapters must be merged first."""
    layers = ia3_layers(model)
    unmerged = [path for path, layer in layers if layer.active_adapter is not None and not layer.merged]
    if unmerged:
        raise AdapterError(f"cannot unwrap '{unmerged[0]}': its active (IA)³ adapter is not merged (merge first)")
    for path, layer in layers:
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer.base_layer)
