"""alchemy_ops.transformers.patch on tiny random Hugging Face causal LMs: the patched model's loss and
every parameter gradient equal the unpatched model's (fp32 tightly, bf16 autocast within bf16
tolerance), with ignored labels, num_items_in_batch and shift_labels; logits as documented; other
instances untouched; models it cannot fuse refused."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="alchemy_ops.transformers needs transformers installed")

from alchemy_ops.transformers import SUPPORTED_MODELS, causal_lm_cross_entropy_loss, patch  # noqa: E402

VOCAB = 160
BATCH, SEQ = 2, 9
# A wide init spreads the logits over several units, so Gemma 2's softcap of 2 bends them visibly.
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    pad_token_id=0,
)
CONFIGS = {
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(**_DECODER),
    "MistralForCausalLM": lambda: transformers.MistralConfig(**_DECODER),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**_DECODER),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**_DECODER, head_dim=8),
    "GemmaForCausalLM": lambda: transformers.GemmaConfig(**_DECODER, head_dim=8),
    "Gemma2ForCausalLM": lambda: transformers.Gemma2Config(
        **_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=2.0
    ),
    "Phi3ForCausalLM": lambda: transformers.Phi3Config(**_DECODER),
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),  # fmt: skip
}


# The models the patch must support get every case; the others it verifies, one case each.
REQUIRED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel")
CASES = ("labels", "num_items_in_batch", "shift_labels")
MODEL_CASES = [(name, case) for name in CONFIGS for case in (CASES if name in REQUIRED else CASES[1:2])]


def make_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return getattr(transformers, name)(CONFIGS[name]()).train()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with the second sequence right-padded by 3, its padding and 3 random positions
    labelled -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels.view(-1)[torch.randperm(BATCH * SEQ, generator=gen)[:3]] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_kwargs(case: str, labels: torch.Tensor) -> dict:
    if case == "num_items_in_batch":
        # As under gradient accumulation: the non-ignored targets of all micro-batches, not this one's.
        return {"num_items_in_batch": torch.tensor(37)}
    if case == "shift_labels":
        gen = torch.Generator().manual_seed(2)
        shifted = torch.randint(0, VOCAB, labels.shape, generator=gen)
        return {"shift_labels": shifted.masked_fill(torch.rand(labels.shape, generator=gen) < 0.3, -100)}
    return {}


def loss_and_grads(model, batch: dict, kwargs: dict, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model(**batch, **kwargs)
    outputs.loss.backward()
    return outputs, {name: p.grad for name, p in model.named_parameters()}


def assert_grads_close(actual: dict, expected: dict, rtol: float, atol_scale: float) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None and actual[name] is not None, name
        atol = atol_scale * max(float(grad.abs().max()), 1e-3)
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_every_supported_model_is_tested():
    assert set(CONFIGS) == set(SUPPORTED_MODELS)


@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("name, case", MODEL_CASES)
def test_loss_and_gradients_match_unpatched_fp32(name, case, fused):
    reference = make_model(name)
    patched = patch(copy.deepcopy(reference), linear_cross_entropy=fused)
    batch = make_batch()
    kwargs = loss_kwargs(case, batch["labels"])
    expected, expected_grads = loss_and_grads(reference, batch, kwargs)
    actual, actual_grads = loss_and_grads(patched, batch, kwargs)
    assert actual.loss.dtype == torch.float32
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(actual_grads, expected_grads, rtol=1e-4, atol_scale=1e-5)
    assert (actual.logits is None) == fused
    if not fused:
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("name", REQUIRED)
def test_loss_and_gradients_match_unpatched_bf16_autocast(name, fused):
    reference = make_model(name)
    patched = patch(copy.deepcopy(reference), linear_cross_entropy=fused)
    batch = make_batch()
    kwargs = loss_kwargs("num_items_in_batch", batch["labels"])
    expected, expected_grads = loss_and_grads(reference, batch, kwargs, autocast=True)
    actual, actual_grads = loss_and_grads(patched, batch, kwargs, autocast=True)
    torch.testing.assert_close(actual.loss.float(), expected.loss.float(), rtol=1.6e-2, atol=2e-2)
    assert_grads_close(actual_grads, expected_grads, rtol=5e-2, atol_scale=3e-2)


def test_gemma2_softcap_is_applied():
    """The softcap changes this model's loss a lot, so matching the unpatched loss proves it is applied."""
    model = patch(make_model("Gemma2ForCausalLM"))
    batch = make_batch()
    with torch.no_grad():
        capped = model(**batch).loss
        model.config.final_logit_softcapping = None
        uncapped = model(**batch).loss
    assert abs(float(capped) - float(uncapped)) > 0.1


def test_lm_head_bias_is_used():
    reference = make_model("LlamaForCausalLM")
    reference.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    torch.nn.init.normal_(reference.lm_head.bias, std=1.0)
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    expected, expected_grads = loss_and_grads(reference, batch, {})
    actual, actual_grads = loss_and_grads(patched, batch, {})
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(actual_grads, expected_grads, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["linear_cross_entropy", "cross_entropy"])
def test_without_labels_logits_and_generation_unchanged(fused):
    reference = make_model("LlamaForCausalLM")
    patched = patch(copy.deepcopy(reference), linear_cross_entropy=fused)
    batch = make_batch()
    del batch["labels"]
    with torch.no_grad():
        assert patched(**batch).loss is None
        torch.testing.assert_close(patched(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
        last = patched(**batch, logits_to_keep=1).logits
        assert last.shape == (BATCH, 1, VOCAB)
        torch.testing.assert_close(last, reference(**batch, logits_to_keep=1).logits, rtol=0, atol=0)
        prompt = batch["input_ids"][:1, :4]
        generated = patched.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(
            generated, reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        )


def test_tuple_output():
    reference = make_model("GPT2LMHeadModel")
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    with torch.no_grad():
        expected = reference(**batch).loss
        as_tuple = patched(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected, rtol=1e-5, atol=1e-6)
    assert not any(t.shape[-1:] == (VOCAB,) for t in as_tuple[1:] if torch.is_tensor(t))


def test_eval_mode_builds_the_logits():
    """Evaluation metrics want the logits: in eval mode they are built and ao.cross_entropy takes their loss."""
    reference = make_model("LlamaForCausalLM").eval()
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    with torch.no_grad():
        expected, actual = reference(**batch), patched(**batch)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_other_instances_stay_unpatched_and_copies_keep_the_patch():
    patched = patch(make_model("LlamaForCausalLM"))
    other = make_model("LlamaForCausalLM")
    batch = make_batch()
    assert "forward" not in other.__dict__
    assert other(**batch).logits is not None
    assert patched(**batch).logits is None
    duplicate = copy.deepcopy(patched)
    assert duplicate.forward.__self__ is duplicate
    assert duplicate(**batch).logits is None


def test_patching_again_replaces_the_patch():
    reference = make_model("Qwen2ForCausalLM")
    model = patch(copy.deepcopy(reference))
    batch = make_batch()
    assert patch(model, linear_cross_entropy=False) is model
    assert model.loss_function is causal_lm_cross_entropy_loss
    outputs = model(**batch)
    assert outputs.logits is not None
    torch.testing.assert_close(outputs.loss, reference(**batch).loss, rtol=1e-5, atol=1e-6)
    patch(model)
    assert model(**batch).logits is None


class _ForwardOverridden(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def _custom_loss(logits, labels, vocab_size, **kwargs):
    return logits.sum()


def test_models_it_cannot_patch_raise():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(4, 4))
    config = CONFIGS["LlamaForCausalLM"]()
    with pytest.raises(ValueError, match="cannot patch LlamaForSequenceClassification"):
        patch(transformers.LlamaForSequenceClassification(config))
    mixtral = transformers.MixtralConfig(**_DECODER, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="cannot patch MixtralForCausalLM"):  # its router loss would be lost
        patch(transformers.MixtralForCausalLM(mixtral))
    with pytest.raises(ValueError, match="cannot patch _ForwardOverridden"):
        patch(_ForwardOverridden(config))
    custom = transformers.LlamaForCausalLM(config)
    custom.loss_function = _custom_loss
    with pytest.raises(ValueError, match="custom loss_function"):
        patch(custom)
    wrapped = transformers.LlamaForCausalLM(config)
    wrapped.forward = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match="forward was already replaced"):
        patch(wrapped)
    with pytest.raises(TypeError, match="linear_cross_entropy must be a bool"):
        patch(transformers.LlamaForCausalLM(config), linear_cross_entropy="yes")
