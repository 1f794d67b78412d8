"""Prompt tuning (Lester et al. 2021): learn ``num_virtual_tokens`` embeddings that are
prepended to every input at the embedding layer; the model itself stays frozen.

::

    input_ids ──embed──► [B, L, D] ─┐
    prompt_embeddings  [V, D] ──────┴─cat─► [B, V+L, D] ──► base model ──► logits[:, V:]

The wrapper strips the ``V`` virtual positions from the logits, so what it returns is aligned
to ``input_ids`` and the SFT and DPO losses need no change (virtual tokens never carry loss).

Adapters are saved and loaded in PEFT's ``PROMPT_TUNING`` format: ``adapter_config.json`` and
``adapter_model.safetensors`` holding one tensor ``prompt_embeddings`` ``[V, D]``. Several
prompts can be loaded under different names and switched (``AdapterMethod.activate``);
``None`` switches the virtual tokens off (the base model, DPO's reference).
"""

from pathlib import Path
from typing import Literal

import torch
from ftengine import hookimpl
from ftengine.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter,
)
from ftengine.config import Section
from ftengine.data import IGNORE_INDEX
from ftengine.errors import AdapterError
from pydantic import Field, PositiveInt
from torch import nn

# Both lora and prompt tuning write the adapter_config.json of a run: one adapter per run.
conflicts = ("full", "lora")

ADAPTER_NAME = "default"
TENSOR_KEY = "prompt_embeddings"
PEFT_INIT = {"text": "TEXT", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


class PromptTuningOptions(Section):
    num_virtual_tokens: PositiveInt = Field(20, description="learned embeddings prepended to every input")
    init: Literal["text", "sample_vocab", "random"] = Field(
        "random", description="start from init_text's embeddings, random vocabulary embeddings, or noise"
    )
    init_text: str | None = Field(None, description="text whose token embeddings start the prompt (init: text)")


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------


class PromptTuningModel(nn.Module):
    """A causal LM with named virtual-token prompts, at most one active at a time.

    Attributes the wrapper does not define (``gradient_checkpointing_enable``,
    ``generation_config``, ...) are looked up on the base model, as PEFT's ``PeftModel`` does.
    """

    def __init__(self, model):
        super().__init__()
        self.base_model = model
        self.prompt_embeddings = nn.ParameterDict()
        self.adapter_configs = {}
        self.active_adapter = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self):
        return self.base_model.get_input_embeddings().weight.device

    def get_base_model(self):
        return self.base_model

    def add_prompt(self, name, embeddings, adapter_config):
        """Hold ``embeddings`` ``[V, D]`` as prompt ``name``; the first prompt becomes active."""
        self.prompt_embeddings[name] = nn.Parameter(embeddings.detach().to(torch.float32).clone())
        self.adapter_configs[name] = adapter_config
        if self.active_adapter is None and len(self.prompt_embeddings) == 1:
            self.active_adapter = name

    def set_active_adapter(self, name):
        """Activate prompt ``name``; ``None`` turns the virtual tokens off (the base model)."""
        if name is not None and name not in self.prompt_embeddings:
            raise AdapterError(f"no prompt named '{name}' is loaded (loaded: {', '.join(self.prompt_embeddings)})")
        self.active_adapter = name

    @property
    def num_virtual_tokens(self):
        """Virtual positions the active prompt adds (0 when none is active)."""
        return 0 if self.active_adapter is None else self.prompt_embeddings[self.active_adapter].shape[0]

    def _prepend(self, input_ids, attention_mask, inputs_embeds):
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if self.active_adapter is None:
            return inputs_embeds, attention_mask
        prompt = self.prompt_embeddings[self.active_adapter].to(inputs_embeds.dtype)
        prompt = prompt.unsqueeze(0).expand(batch, -1, -1)
        prefix_mask = attention_mask.new_ones(batch, prompt.shape[1])
        return torch.cat([prompt, inputs_embeds], dim=1), torch.cat([prefix_mask, attention_mask], dim=1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        """The base model's output for the real tokens. ``logits_to_keep`` counts real positions
        too: a tensor of positions in ``input_ids``, or the last ``k`` (``k`` <= input length)."""
        virtual = self.num_virtual_tokens
        embeds, mask = self._prepend(input_ids, attention_mask, inputs_embeds)
        if labels is not None and virtual:
            labels = torch.cat([labels.new_full((labels.shape[0], virtual), IGNORE_INDEX), labels], dim=1)
        if torch.is_tensor(logits_to_keep):
            kwargs["logits_to_keep"] = logits_to_keep + virtual
        elif logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        outputs = self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        if "logits_to_keep" not in kwargs:
            outputs.logits = outputs.logits[:, virtual:]
        return outputs

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Generate with the prompt prepended on the first step; the KV cache carries it after.

        Returns ``input_ids`` followed by the new tokens, like ``generate`` on ``input_ids``.
        """
        if self.active_adapter is None:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds, mask = self._prepend(input_ids, attention_mask, None)
        # Given inputs_embeds alone, transformers returns only the generated tokens.
        output = self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if torch.is_tensor(output):
            return torch.cat([input_ids, output], dim=1)
        output.sequences = torch.cat([input_ids, output.sequences], dim=1)
        return output


# --------------------------------------------------------------------------------------------
# initialisation and the PEFT config
# --------------------------------------------------------------------------------------------


def base_name_or_path(model):
    return getattr(model, "name_or_path", None) or None


def initial_prompt(model, tokenizer, options):
    """The starting ``[V, D]`` prompt for ``options.init`` (seeded by the core's seed)."""
    embedding = model.get_input_embeddings().weight.detach()
    count = options.num_virtual_tokens
    if options.init == "random":
        # Noise at the scale of the real token embeddings, so the first steps are not dominated
        # by out-of-distribution inputs (PEFT's RANDOM draws N(0, 1) whatever the model).
        return torch.randn(count, embedding.shape[1], device=embedding.device) * embedding.float().std()
    if options.init == "sample_vocab":
        ids = torch.randint(0, embedding.shape[0], (count,), device=embedding.device)
    else:
        ids = torch.tensor(text_token_ids(tokenizer, options.init_text, count), device=embedding.device)
    return embedding[ids].float()


def text_token_ids(tokenizer, text, count):
    """``text`` tokenised as PEFT does (special tokens included), repeated or cut to ``count``."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise AdapterError("prompt_tuning.init_text: the text tokenises to nothing; give some words")
    return (ids * -(-count // len(ids)))[:count]


def peft_config(model, options):
    """The ``adapter_config.json`` PEFT writes for a prompt-tuning adapter of ``model``."""
    base = model.config
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_name_or_path(model),
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": base.num_attention_heads,
        "num_layers": base.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": options.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": PEFT_INIT[options.init],
        "prompt_tuning_init_text": options.init_text if options.init == "text" else None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": model.get_input_embeddings().weight.shape[1],
        "tokenizer_kwargs": None,
        # PEFT refuses a TEXT config without it, even when only loading the trained values.
        "tokenizer_name_or_path": base_name_or_path(model) if options.init == "text" else None,
    }


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("prompt_tuning", PromptTuningOptions)


@hookimpl
def ftengine_validate(config):
    options = config.prompt_tuning
    if config.train.packing:
        return [
            "train.packing: prompt tuning prepends its virtual tokens to each row, so in a packed row only the first "
            "example would see them; packing is not supported with prompt_tuning: set train.packing: false"
        ]
    if options.init == "text" and not (options.init_text or "").strip():
        return [
            "prompt_tuning.init_text: init is 'text' but no text is given: set prompt_tuning.init_text, or use init: sample_vocab"
        ]
    if options.init != "text" and options.init_text is not None:
        return [
            f"prompt_tuning.init_text is only used with init: text (init is '{options.init}'): set init: text or remove init_text"
        ]
    return []


@hookimpl
def ftengine_adapter_methods():
    return [PROMPT_TUNING]


class PromptTuningMethod:
    """Prompts as an ``ftengine.AdapterMethod``: the first one wraps the model in a
    ``PromptTuningModel``, which holds them all by name."""

    def inject(self, model, tokenizer, config):
        wrapper = PromptTuningModel(model)
        options = config.prompt_tuning
        wrapper.add_prompt(ADAPTER_NAME, initial_prompt(model, tokenizer, options), peft_config(model, options))
        return wrapper

    def adapter_name(self):
        return ADAPTER_NAME

    def trainable_names(self, model):
        return [f"prompt_embeddings.{name}" for name in model.prompt_embeddings]

    def save(self, model, path):
        written = write_adapter(path, model.adapter_configs[ADAPTER_NAME], {TENSOR_KEY: model.prompt_embeddings[ADAPTER_NAME]})
        return [str(p) for p in written]

    def claims(self, adapter_config):
        return ["prompt_tuning"] if adapter_config.get("peft_type") == "PROMPT_TUNING" else None

    def load(self, model, path, name):
        adapter_config, prompt = read_adapter(path)
        width = model.get_input_embeddings().weight.shape[1]
        if prompt.shape[1] != width:
            raise AdapterError(f"{path}: '{TENSOR_KEY}' has token_dim {prompt.shape[1]} but the model's embeddings have {width}")
        wrapper = model if isinstance(model, PromptTuningModel) else PromptTuningModel(model)
        wrapper.add_prompt(name, prompt.to(wrapper.device), adapter_config)
        return wrapper

    def loaded(self, model):
        return list(model.prompt_embeddings) if isinstance(model, PromptTuningModel) else []

    def activate(self, model, name):
        model.set_active_adapter(name)

    def set_rows(self, model, names):
        """Prompts are not mixed in a batch: each adds its own number of positions before the
        input, which shifts every row's cache and positions differently."""
        for name in names or ():
            if name is not None:
                raise AdapterError(
                    f"'{name}' is a prompt-tuning adapter, which cannot share a batch row by row with other adapters; "
                    f"generate with it alone (ftengine generate --adapter {name}=DIR)"
                )

    def merge(self):
        raise AdapterError("a prompt-tuning adapter cannot be merged into the weights: load it with the base model instead")

    def unmerge(self):
        pass  # nothing is ever merged

    def unwrap(self):
        pass  # nothing is ever merged

    def delete(self, model, name):
        del model.prompt_embeddings[name]
        model.adapter_configs.pop(name, None)
        if model.active_adapter == name:
            model.active_adapter = None


PROMPT_TUNING = PromptTuningMethod()


def read_adapter(path):
    """``(adapter_config, prompt [V, D])`` of a PEFT prompt-tuning directory, or ``None`` when
    the directory holds another kind of adapter."""
    path = Path(path)
    adapter_config = read_adapter_config(path)
    if adapter_config.get("peft_type") != "PROMPT_TUNING":
        return None
    config_file = path / CONFIG_FILE
    if adapter_config.get("task_type") != "CAUSAL_LM":
        raise AdapterError(
            f"{config_file}: task_type is {adapter_config.get('task_type')!r}; only CAUSAL_LM prompts can be loaded"
        )
    if adapter_config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{config_file}: num_transformer_submodules must be 1 for a causal LM")
    tensors = read_adapter_tensors(path)
    if TENSOR_KEY not in tensors:
        raise AdapterError(f"{path / WEIGHTS_FILE}: no tensor '{TENSOR_KEY}' (found {sorted(tensors)[:3]})")
    prompt = tensors[TENSOR_KEY]
    expected = (adapter_config.get("num_virtual_tokens"), adapter_config.get("token_dim"))
    if tuple(prompt.shape) != expected:
        raise AdapterError(f"{path / WEIGHTS_FILE}: '{TENSOR_KEY}' has shape {tuple(prompt.shape)}, its config says {expected}")
    return adapter_config, prompt
