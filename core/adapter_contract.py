"""The adapter contract: what every adapter plugin guarantees, as a pytest class to subclass.

    from ftengine.adapter_contract import AdapterContract

    class TestLoraContract(AdapterContract):
        plugins = ["lora"]
        overrides = {"lora": {"r": 4, "dropout": 0.1}}   # config sections, as in the YAML file

Each test builds the tiny model of ``ftengine.testing`` through ``ftengine.build.configure`` and
``ftengine.build.build``, as a training run does, and drives the adapter only through the core's
dispatch to its method object (``ftengine.methods.adapter_methods``):

* at initialisation the output equals the base model's;
* only the adapter's parameters train, and a training step leaves the base weights as they were;
* save, then load into a fresh build: the same logits, exactly;
* merged output equals unmerged, merging twice changes nothing, unmerging restores the base
  (skipped, with the reason, when ``supports_merge = False``);
* with no active adapter the output is the base model's, and re-activating restores it.

Override ``base_model`` when the plugin's base differs from the full-precision model (a
quantised base), and ``atol`` for the tolerance of outputs computed in different ways.
"""

from types import SimpleNamespace

import pytest
import torch

from .build import build, configure
from .loop import save
from .methods import adapter_methods
from .testing import sft_rows, write_jsonl


class AdapterContract:
    plugins = ()
    overrides = {}
    supports_merge = True
    adapter_name = "default"  # the adapter a build creates
    atol = 1e-5  # for outputs computed in different ways (merged vs unmerged, init vs base)
    unmerge_atol = 1e-6  # for base weights restored by unmerge

    # ----------------------------------------------------------------------------------------
    # helpers a subclass may override
    # ----------------------------------------------------------------------------------------

    def base_model(self, model_dir):
        """The model the adapter is expected to leave unchanged (no adapter, same precision)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def build(self, model_dir, tmp_path):
        """Configure and build the tiny model with ``plugins`` and ``overrides``."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        base = {
            "model": str(model_dir),
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", sft_rows(8)))},
            "train": {"device": "cpu", "seed": 0},
        }
        for section, values in self.overrides.items():
            base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
        config, pm = configure(plugins=list(self.plugins), base=base)
        model, tokenizer, info = build(config, pm)
        return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, info=info, config=config, pm=pm)

    @staticmethod
    def inputs():
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, 256, (2, 12), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    @classmethod
    @torch.no_grad()
    def logits(cls, model):
        return model(**cls.inputs()).logits

    @staticmethod
    @torch.no_grad()
    def perturb(model, trainable, scale=0.1):
        """Move the parameters named in ``trainable`` (a build's ``info["trainable"]``) away from
        their initial values (LoRA's B starts at zero), by seeded noise."""
        generator = torch.Generator().manual_seed(1)
        parameters = dict(model.named_parameters())
        for name in trainable:
            parameter = parameters[name]
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter))

    @staticmethod
    def frozen_state(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def skip_unless_merge(self):
        if not self.supports_merge:
            pytest.skip(
                f"{type(self).__name__}.supports_merge is False: plugins {list(self.plugins)} do not fold their adapter into the base weights"
            )

    @pytest.fixture
    def run(self, tiny_model_dir, tmp_path):
        return self.build(tiny_model_dir, tmp_path)

    @pytest.fixture
    def base_logits(self, tiny_model_dir):
        return self.logits(self.base_model(tiny_model_dir))

    # ----------------------------------------------------------------------------------------
    # the contract
    # ----------------------------------------------------------------------------------------

    def test_output_at_initialisation_equals_base(self, run, base_logits):
        torch.testing.assert_close(self.logits(run.model), base_logits, atol=self.atol, rtol=0)

    def test_only_adapter_parameters_require_grad(self, run):
        requires_grad = {n for n, p in run.model.named_parameters() if p.requires_grad}
        assert requires_grad, "the adapter plugins named no trainable parameter"
        assert requires_grad == set(run.info["trainable"])
        assert any(not p.requires_grad for p in run.model.parameters()), "the base model must stay frozen"

    def test_training_step_leaves_base_unchanged(self, run, base_logits):
        frozen = self.frozen_state(run.model)
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        run.model.train()
        batch = self.inputs()
        run.model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        run.model.eval()
        parameters = dict(run.model.named_parameters())
        for name, before in frozen.items():
            assert torch.equal(parameters[name], before), name
        adapter_methods(run.pm).activate(run.model, None)
        torch.testing.assert_close(self.logits(run.model), base_logits, atol=self.atol, rtol=0)

    def test_save_then_load_into_a_fresh_build_round_trips(self, run, base_logits, tiny_model_dir, tmp_path):
        self.perturb(run.model, run.info["trainable"])
        expected = self.logits(run.model)
        assert (expected - base_logits).abs().max() > 1e-3, "perturbing the adapter must change the output"
        saved = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "saved")

        fresh = self.build(tiny_model_dir, tmp_path / "fresh")
        methods = adapter_methods(fresh.pm)
        model = methods.load(fresh.model, saved, "loaded", fresh.config)
        assert "loaded" in methods.loaded(model), "the method that loaded the adapter does not list it"
        methods.activate(model, "loaded")
        assert torch.equal(self.logits(model.eval()), expected)

    def test_merged_equals_unmerged(self, run):
        self.skip_unless_merge()
        self.perturb(run.model, run.info["trainable"])
        unmerged = self.logits(run.model)
        adapter_methods(run.pm).merge(run.model)
        torch.testing.assert_close(self.logits(run.model), unmerged, atol=self.atol, rtol=0)

    def test_merging_twice_changes_nothing(self, run):
        self.skip_unless_merge()
        self.perturb(run.model, run.info["trainable"])
        adapter_methods(run.pm).merge(run.model)
        state, logits = {k: v.clone() for k, v in run.model.state_dict().items()}, self.logits(run.model)
        adapter_methods(run.pm).merge(run.model)
        assert all(torch.equal(v, state[k]) for k, v in run.model.state_dict().items())
        assert torch.equal(self.logits(run.model), logits)

    def test_unmerge_restores_the_base_weights(self, run):
        self.skip_unless_merge()
        frozen = self.frozen_state(run.model)
        self.perturb(run.model, run.info["trainable"])
        unmerged = self.logits(run.model)
        adapter_methods(run.pm).merge(run.model)
        adapter_methods(run.pm).unmerge(run.model)
        parameters = dict(run.model.named_parameters())
        for name, before in frozen.items():
            torch.testing.assert_close(parameters[name], before, atol=self.unmerge_atol, rtol=0, msg=name)
        torch.testing.assert_close(self.logits(run.model), unmerged, atol=self.atol, rtol=0)

    def test_no_active_adapter_gives_the_base_output(self, run, base_logits):
        self.perturb(run.model, run.info["trainable"])
        adapted = self.logits(run.model)
        adapter_methods(run.pm).activate(run.model, None)
        torch.testing.assert_close(self.logits(run.model), base_logits, atol=self.atol, rtol=0)
        adapter_methods(run.pm).activate(run.model, self.adapter_name)
        assert torch.equal(self.logits(run.model), adapted)
