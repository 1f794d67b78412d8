"""A merged transformers model as one GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

    write_gguf(model, tokenizer, "out/model-q8_0.gguf", "q8_0", name="contacts")

What the converter does and llama.cpp relies on, for the architectures in ``ARCHITECTURES``:

* tensor names through ``gguf.TensorNameMap`` (``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``);
* llama (and mistral, which llama.cpp runs as llama) ``q_proj``/``k_proj`` rows permuted from
  transformers' rotate-half layout to the interleaved pairs llama.cpp rotates; qwen2 is not;
* tied embeddings: no ``output.weight`` (llama.cpp reuses ``token_embd.weight``);
* norms and every 1-D tensor stay f32; a tensor whose rows are not a multiple of the quantised
  type's block (32 values) is written f16 instead (the converter's fallback), and reported;
* under q4_0/q4_1 the output head (or the tied embedding that serves as one) is q8_0, as
  ``llama-quantize`` keeps it at a higher precision than the body;
* the tokenizer as byte-level BPE (``tokenizer.ggml.model = gpt2``: tokens, token types,
  merges, special token ids, ``add_bos``/``add_eos``) with its pre-tokenizer named as llama.cpp
  names it (recognised by the converter's own test string and hashes), and the chat template.
"""

import json
from hashlib import sha256

import gguf
import torch
from ftengine.errors import FtengineError
from ftengine.log import warn

#: transformers ``model_type`` -> the GGUF architecture llama.cpp runs it as, and whether its
#: q/k projections are permuted for llama.cpp's rotary layout.
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}

Q = gguf.GGMLQuantizationType
#: ``--type`` -> (the type of the model's matrices, ``general.file_type``).
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
BLOCK_QUANTISED = {Q.Q8_0, Q.Q4_0, Q.Q4_1}

# llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) names a BPE pre-tokenizer by the sha256
# of the token ids its tokenizer gives this text; these are its hashes for the pre-tokenizers of
# the supported architectures' usual tokenizers.
PRE_TOKENIZER_TEST = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}


class ExportError(FtengineError):
    """A model, tokenizer or type that cannot be exported as asked."""


def gguf_architecture(model_type, where):
    """The GGUF architecture for transformers' ``model_type``, or ``ExportError`` naming it and
    the supported ones (``where`` says which model)."""
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"{where}: architecture {model_type!r} cannot be exported to GGUF; supported: {', '.join(ARCHITECTURES)}. "
            f"Export it with --format safetensors and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


def pre_tokenizer(tokenizer, backend):
    """llama.cpp's name for ``tokenizer``'s pre-tokenizer (``backend``: its ``tokenizer.json``),
    or ``None`` when unknown."""
    ids = tokenizer.encode(PRE_TOKENIZER_TEST, add_special_tokens=False)
    known = PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())
    if known is not None:
        return known
    # Another vocabulary with a known split: named by its regex, as transformers' GGUF reader
    # maps names to regexes.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    split = backend.get("pre_tokenizer") or {}
    if split.get("type") == "ByteLevel" and split.get("use_regex"):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    steps = split.get("pretokenizers") or []
    regex = steps[0].get("pattern", {}).get("Regex") if steps and steps[0].get("type") == "Split" else None
    return next((name for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items() if pattern == regex), None)


def permute_for_rotary(weight, heads):
    """Rows of a q/k projection from rotate-half order to llama.cpp's interleaved pairs
    (``LlamaModel.permute`` of the converter)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name, data, requested, head):
    """The GGML type ``data`` (GGUF name ``name``) is written in under ``requested``; ``head``
    names the tensor that serves as the output head."""
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if requested in BLOCK_QUANTISED and data.shape[-1] % gguf.GGML_QUANT_SIZES[requested][0]:
        return Q.F16
    if requested in (Q.Q4_0, Q.Q4_1) and name == head:
        return Q.Q8_0
    return requested


def model_tensors(model, arch, permute, tied):
    """``(gguf name, float32 array)`` for each tensor of ``model``, as llama.cpp expects them."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"tensor {name} of this {config.model_type} model has no GGUF name; it cannot be exported")
        data = tensor.detach().to(torch.float32)
        if permute and name.endswith("q_proj.weight"):
            data = permute_for_rotary(data, config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            data = permute_for_rotary(data, config.num_key_value_heads)
        yield new_name, data.numpy()


def add_hyperparameters(writer, config):
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"rope scaling {rope.get('rope_type')!r} is not written by this exporter; use --format safetensors and "
            f"llama.cpp's convert_hf_to_gguf.py"
        )


def add_tokenizer(writer, tokenizer, config):
    """The tokenizer as byte-level BPE, its special tokens and its chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    bpe = backend.get("model", {})
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise ExportError(
            f"the tokenizer ({type(tokenizer).__name__}, model {bpe.get('type')!r}) is not byte-level BPE, the kind this "
            f"exporter writes (tokenizer.ggml.model gpt2); use --format safetensors and llama.cpp's convert_hf_to_gguf.py"
        )
    if not bpe.get("merges"):  # gguf writes no empty array, and llama.cpp refuses a gpt2 vocabulary without merges
        raise ExportError("the tokenizer has no BPE merges (bytes only), which a GGUF gpt2 vocabulary cannot hold")
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer(tokenizer, backend)
    if pre is None:
        warn(
            "the tokenizer's pre-tokenizer is not one llama.cpp names; the GGUF says 'default', with which llama.cpp "
            "may split text differently from ftengine (transformers' GGUF reader splits as GPT-2)"
        )
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path, type_name, name="model"):
    """Write ``model`` (a merged transformers causal LM of an ``ARCHITECTURES`` type) and its
    tokenizer to the GGUF file ``path``, matrices in ``type_name`` (a key of ``TYPES``).

    :return: the tensors written in another type than asked (``{gguf name: type name}``): rows
        not a multiple of the type's block, or a q4 type's output head in q8_0.
    """
    config = model.config
    arch, permute = gguf_architecture(config.model_type, name)
    requested, file_type = TYPES[type_name]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_tokenizer(writer, tokenizer, config)
    head = "token_embd.weight" if tied else "output.weight"
    other_types = {}
    for tensor_name, data in model_tensors(model, arch, permute, tied):
        qtype = tensor_type(tensor_name, data, requested, head)
        if qtype != requested and data.ndim > 1:
            other_types[tensor_name] = qtype.name.lower()
        writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return other_types
