"""The adapter alone as a GGUF LoRA, which llama.cpp applies over the base model's GGUF::

    llama-cli -m base-f16.gguf --lora adapter-lora.gguf

What llama.cpp reads (``src/llama-adapter.cpp``; written as its ``convert_lora_to_gguf.py``
does): ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, and for
each adapted base tensor ``<gguf name>.lora_a`` ``[r, in]`` and ``<gguf name>.lora_b``
``[out, r]`` (numpy shapes: PyTorch's ``lora_A.weight`` and ``lora_B.weight`` as they are).
llama.cpp scales every update by ``alpha / r``, r read from each tensor.

The factors come from the adapter's method (``AdapterMethod.lora_factors``), so a third-party
method exports too, and one without factors is refused by name.

The base GGUF (``gguf_model``) stores llama's q and k rows permuted for llama.cpp's rotary
layout; the update ``B A`` of those rows is permuted the same way, which permutes B's rows alone.
"""

import gguf
import numpy as np
from ftengine.checkpoint import atomic_write
from ftengine.errors import AdapterError
from ftengine.methods import adapter_methods

from .gguf_model import gguf_architecture, permute_for_rotary

FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}


def lora_tensors(model_config, factors):
    """``(alpha, {gguf tensor name: array})`` of ``factors`` (``{weight name: (A, B, scale)}``).

    llama.cpp applies one ``alpha`` to every tensor (scale = alpha / r): alpha is the first
    update's ``scale · r``, and an update whose ``scale · r`` differs has the ratio folded into B.
    """
    arch, permute = gguf_architecture(model_config.model_type, "the adapter's base model")
    names = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    alpha, tensors = None, {}
    for weight_name, (lora_a, lora_b, scale) in factors.items():
        gguf_name = names.get_name(weight_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise AdapterError(
                f"the adapter changes '{weight_name}', which has no tensor in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} "
                f"layout; write the merged model instead: leave out --lora-only"
            )
        rank = lora_a.shape[0]
        alpha = scale * rank if alpha is None else alpha
        lora_b = lora_b.float().cpu().numpy() * (scale * rank / alpha)
        if permute and weight_name.endswith("q_proj.weight"):
            lora_b = permute_for_rotary(lora_b, model_config.num_attention_heads)
        elif permute and weight_name.endswith("k_proj.weight"):
            lora_b = permute_for_rotary(lora_b, model_config.num_key_value_heads)
        tensors[f"{gguf_name}.lora_a"] = lora_a.float().cpu().numpy()
        tensors[f"{gguf_name}.lora_b"] = lora_b
    return alpha, tensors


def write_lora_gguf(path, model, pluginmanager, adapter_name, float_type="f32"):
    """Write adapter ``adapter_name`` of ``model`` (its method's ``lora_factors``) as a GGUF LoRA
    at ``path``, atomically; return ``path``.

    :param float_type: ``f32`` (the factors as trained) or ``f16`` (half the size).
    """
    factors = adapter_methods(pluginmanager).lora_factors(model, adapter_name)
    if not factors:
        raise AdapterError(f"adapter '{adapter_name}' changes no weight: there is no LoRA to write")
    alpha, tensors = lora_tensors(model.config, factors)
    arch, _ = gguf_architecture(model.config.model_type, "the adapter's base model")
    dtype = FLOAT_TYPES[float_type]

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, tensor in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)
