"""PEFT (tljax.peft): LoRA, adapters and prompt tuning woven into tiny BERTs — parameter counts, identity at init,
merge and export (transformers reloads the merged folder), unmerged folders, training through the engine with the
"peft" rule set (the base untouched and stateless) and config errors."""

import itertools
import types

import jax
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, token_batch
from engine_driver import global_batch

import tljax.models as tm
from tljax import engine, freezing, partition, peft, rules, tree


@pytest.fixture(scope="module")
def loaded(tiny_bert_dir):
    return tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler")


def inputs():
    ids, mask = token_batch(4, 9)
    return {"input_ids": ids, "attention_mask": mask}


def logits(loaded, params=None):
    variables = {"params": loaded.params if params is None else params, **loaded.state}
    return np.asarray(loaded.model.apply(variables, **inputs())["logits"])


def perturbed(loaded, scale=0.05, seed=0):
    """Every parameter moved a little (a trained-looking tree: LoRA's B and adapters' up-projections non-zero)."""
    leaves, treedef = jax.tree.flatten(loaded.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_adds_r_times_din_plus_dout_per_kernel(loaded, rank):
    targets = [r"attention/(query|value)/kernel$", r"mlp/fc1/kernel$"]
    lora = peft.apply(loaded, [peft.LoRA(rank=rank, targets=targets)])
    flat = tree.flatten(lora.params)
    kernels = [p for p in flat if p.endswith("/kernel") and any(s in p for s in ("query", "value", "fc1"))]
    assert len(kernels) == 6  # 2 layers x (query, value, fc1)
    want = sum(rank * sum(flat[k].shape) for k in kernels)  # r * (d_in + d_out) each
    assert peft.trainable_count(lora) == want == tree.count(lora.params) - tree.count(loaded.params)
    for k in kernels:
        m = k.removesuffix("/kernel")
        assert flat[m + "/lora_a"].shape == (flat[k].shape[0], rank)
        assert flat[m + "/lora_b"].shape == (rank, flat[k].shape[1]) and not np.any(flat[m + "/lora_b"])
    base = tree.flatten(loaded.params)
    assert all(np.array_equal(flat[p], v) for p, v in base.items())  # the base is unchanged


@pytest.mark.parametrize(
    "methods",
    [[peft.LoRA(rank=4, dropout=0.1)], [peft.Adapter(size=8)], [peft.Adapter(size=8, style="pfeiffer")],
     [peft.LoRA(rank=2), peft.Adapter(size=4)]],
    ids=["lora", "houlsby", "pfeiffer", "lora+adapter"],
)  # fmt: skip
def test_outputs_equal_the_base_model_at_init(loaded, methods):
    woven = peft.apply(loaded, methods)
    base = loaded.model.apply(loaded.variables, **inputs())
    out = woven.model.apply(woven.variables, **inputs())
    for key in ("last_hidden_state", "pooler_output", "logits"):
        assert max_abs_diff(out[key], base[key]) == 0.0


def test_adapter_counts_and_placement(loaded):
    houlsby = peft.apply(loaded, [peft.Adapter(size=8)])
    paths = {p.rsplit("/", 1)[0] for p in peft.added_paths(houlsby)}
    assert paths == {f"backbone/encoder/layer_{i}/{m}" for i in range(2) for m in ("attention/out", "mlp/fc2")}
    assert peft.trainable_count(houlsby) == 4 * (2 * 32 * 8 + 8 + 32)  # 2 d m + m + d per placement
    pfeiffer = peft.apply(loaded, [peft.Adapter(size=8, style="pfeiffer")])
    assert {p.rsplit("/", 1)[0] for p in peft.added_paths(pfeiffer)} == {
        f"backbone/encoder/layer_{i}/mlp/fc2" for i in range(2)
    }


def test_merged_equals_unmerged_and_loads_in_transformers(loaded, tmp_path):
    from transformers import BertForSequenceClassification

    lora = peft.apply(loaded, [peft.LoRA(rank=4, alpha=8, targets=[r"attention/\w+/kernel$", r"mlp/fc\d/kernel$"])])
    trained = perturbed(lora)
    merged = peft.merge(lora, trained)
    assert peft.methods_of(merged) == () and not peft.added_paths(merged)
    assert tree.paths(merged.params) == tree.paths(loaded.params)
    unmerged_logits = logits(lora, trained)
    assert max_abs_diff(logits(merged), unmerged_logits) <= 1e-5
    folder = tm.save_pretrained(tmp_path / "merged", lora, params=trained)  # save_pretrained merges LoRA itself
    assert not (folder / "tljax_peft.json").exists()
    ref = BertForSequenceClassification.from_pretrained(folder).eval()
    x = inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(x["input_ids"]).long(), attention_mask=torch.tensor(x["attention_mask"]))
    assert max_abs_diff(want.logits.numpy(), unmerged_logits) <= 1e-5
    again = tm.load_pretrained(folder)
    assert max_abs_diff(logits(again), unmerged_logits) <= 1e-5


@pytest.mark.parametrize(
    "methods",
    [[peft.LoRA(rank=2)], [peft.Adapter(size=4)], [peft.PromptTuning(length=3)],
     [peft.LoRA(rank=2), peft.Adapter(size=4, style="pfeiffer"), peft.PromptTuning(length=2, init="normal")]],
    ids=["lora", "adapter", "prompt", "all"],
)  # fmt: skip
def test_unmerged_folders_reload(loaded, tmp_path, methods):
    woven = peft.apply(loaded, methods)
    trained = perturbed(woven, seed=1)
    folder = tm.save_pretrained(tmp_path / "unmerged", woven, params=trained, merge=False)
    assert (folder / "tljax_peft.json").is_file()
    again = tm.load_pretrained(folder)
    assert [m.to_config() for m in peft.methods_of(again)] == [m.to_config() for m in methods]
    assert max_abs_diff(logits(again), logits(woven, trained)) <= 1e-6
    if not any(m.KIND == "lora" for m in methods) or len(methods) == 1:
        return
    merged_lora = tm.load_pretrained(tm.save_pretrained(tmp_path / "mixed", woven, params=trained))
    assert [m.KIND for m in peft.methods_of(merged_lora)] == ["adapter", "prompt"]  # LoRA merged, the rest kept
    assert max_abs_diff(logits(merged_lora), logits(woven, trained)) <= 1e-5


def test_prompt_tuning_keeps_output_shapes_and_steers_the_tokens(loaded):
    woven = peft.apply(loaded, [peft.PromptTuning(length=5)])
    assert peft.added_paths(woven) == ["backbone/embeddings/prompt"]  # a stem parameter (block-depth rules see it)
    table = tree.flatten(woven.params)["backbone/embeddings/word_embeddings/embedding"]
    prompt = tree.flatten(woven.params)["backbone/embeddings/prompt"]
    assert all(any(np.array_equal(row, t) for t in np.asarray(table)) for row in np.asarray(prompt))  # vocab init
    base = loaded.model.apply(loaded.variables, **inputs())
    out = woven.model.apply(woven.variables, **inputs())
    assert out["last_hidden_state"].shape == base["last_hidden_state"].shape  # prompt positions removed again
    assert max_abs_diff(out["last_hidden_state"], base["last_hidden_state"]) > 1e-3  # tokens attend to the prompt
    mean = tm.load_pretrained(loaded.report.source, num_classes=3, pooling="mean")  # pooling sees the real tokens
    assert peft.apply(mean, [peft.PromptTuning(length=5)]).model.apply(
        peft.apply(mean, [peft.PromptTuning(length=5)]).variables, **inputs()
    )["features"].shape == (4, 32)


def test_training_moves_only_the_peft_parameters_and_the_head(loaded, tmp_path):
    lora = peft.apply(loaded, [peft.LoRA(rank=4), peft.Adapter(size=4)])
    part = partition.build(lora.params, rules.peft(lora), learning_rate=1e-2)
    trainable = {p for p, t in tree.flatten(part.trainable_mask).items() if t}
    assert trainable == set(peft.added_paths(lora)) | {"head/out/kernel", "head/out/bias"}
    print(part.summary())
    schedule = freezing.get("peft", lora, steps=4, lr=1e-2)
    data = lambda start: (global_batch(s) for s in itertools.count(start))
    result = engine.fit(lora, schedule, data, engine.EngineConfig(str(tmp_path / "run"), devices=1, progress=False))
    before, after = tree.flatten(lora.params), tree.flatten(result.state.params)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == trainable  # every trainable leaf moved (LoRA B and adapter up leave zero), nothing else
    # optimizer state (AdamW mu and nu) exists for the trainable leaves only
    opt_leaves = [x for x in jax.tree.leaves(result.state.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in opt_leaves) == 2 * tree.count({p: before[p] for p in trainable})


def test_peft_then_full_thaws_the_base(loaded, tmp_path):
    lora = peft.apply(loaded, [peft.LoRA(rank=2)])
    schedule = freezing.get("peft_then_full", lora, peft_steps=2, ft_steps=2, peft_lr=1e-2, ft_lr=1e-3)
    data = lambda start: (global_batch(s) for s in itertools.count(start))
    result = engine.fit(lora, schedule, data, engine.EngineConfig(str(tmp_path / "run"), devices=1, progress=False))
    before, after = tree.flatten(lora.params), tree.flatten(result.state.params)
    fc1 = "backbone/encoder/layer_0/mlp/fc1/kernel"
    assert not np.array_equal(before[fc1], after[fc1])


def test_config_round_trip_and_errors(loaded, tmp_path):
    lora = peft.from_config({"method": "lora", "rank": 4, "targets": [r"query/kernel$"]})
    assert lora == peft.LoRA(rank=4, targets=(r"query/kernel$",))
    assert peft.from_config(lora.to_config()) == lora
    with pytest.raises(ValueError, match="unknown PEFT method 'loha'"):
        peft.from_config({"method": "loha"})
    with pytest.raises(ValueError, match=r"has no option\(s\) \['r'\]"):
        peft.from_config({"method": "lora", "r": 4})
    with pytest.raises(ValueError, match="rank must be a positive int"):
        peft.LoRA(rank=0)
    with pytest.raises(TypeError, match="wrap it"):
        peft.LoRA(targets=r"query/kernel$")
    with pytest.raises(ValueError, match="matches no kernel of this model"):
        peft.apply(loaded, [peft.LoRA(targets=[r"qkv/kernel$"])])
    with pytest.raises(ValueError, match="rank 64 exceeds a dimension"):
        peft.apply(loaded, [peft.LoRA(rank=64)])
    with pytest.raises(ValueError, match="targets rank-2 Dense kernels"):  # a conv kernel
        peft.LoRA(targets=["conv"]).resolve({"stage_0/conv/kernel": (3, 3, 4, 4)}, loaded.family)
    with pytest.raises(ValueError, match="prompt tuning supports the BERT-family"):
        peft.PromptTuning().resolve({}, types.SimpleNamespace(__name__="tljax.models.vit"))
    with pytest.raises(ValueError, match="has no PEFT parameters"):
        rules.peft(loaded)
    adapters = peft.apply(loaded, [peft.Adapter(size=4)])
    with pytest.raises(ValueError, match="add layers no kernel can absorb"):
        peft.merge(adapters)
    with pytest.raises(ValueError, match="already has PEFT methods"):
        peft.apply(adapters, [peft.LoRA()])


def test_l2_sp_counts_peft_leaves_as_new(loaded):
    """L2-SP's default groups: transferred weights pulled toward w0, the head and the PEFT leaves toward zero."""
    from tljax import regularizers

    lora = peft.apply(loaded, [peft.LoRA(rank=2)])
    reg = regularizers.l2_sp(lora, alpha=0.1, beta=0.01)
    for path in peft.added_paths(lora):
        assert reg.strengths[path] == ("beta", 0.01), path
    assert reg.strengths["backbone/encoder/layer_0/attention/query/kernel"] == ("alpha", 0.1)


@pytest.mark.parametrize(
    "method", [peft.LoRA(rank=2, targets=[r"^head/out/kernel$"]), peft.Adapter(size=4, targets=[r"head/out/kernel$"])],
    ids=["lora", "adapter"],
)  # fmt: skip
def test_target_matching_only_the_head_is_an_error(loaded, method):
    """Regression: a target that matched only the head was accepted and added nothing (the head is not woven);
    LoRA's export then raised a bare KeyError 'head/out/lora_a' after training."""
    with pytest.raises(ValueError, match=r"matches only \['head/out/kernel'\] outside the backbone.*rule set"):
        peft.apply(loaded, [method])


def test_target_matching_backbone_and_head_adapts_the_backbone_only(loaded, tmp_path):
    """Regression: r"out/kernel$" (the attention output projections) also matches head/out/kernel; the head was
    resolved as a target, nothing was added there, and merge / save_pretrained raised KeyError 'head/out/lora_a'."""
    lora = peft.apply(loaded, [peft.LoRA(rank=2, targets=[r"out/kernel$"])])
    outs = {f"backbone/encoder/layer_{i}/attention/out" for i in range(2)}
    assert peft.methods_of(lora)[0].modules == outs
    assert set(peft.added_paths(lora)) == {f"{m}/lora_{x}" for m in outs for x in "ab"}
    trained = perturbed(lora, seed=2)
    merged = peft.merge(lora, trained)
    assert tree.paths(merged.params) == tree.paths(loaded.params)
    np.testing.assert_array_equal(
        tree.flatten(merged.params)["head/out/kernel"], tree.flatten(trained)["head/out/kernel"]
    )
    assert max_abs_diff(logits(merged), logits(lora, trained)) <= 1e-5
    again = tm.load_pretrained(tm.save_pretrained(tmp_path / "merged", lora, params=trained))
    assert max_abs_diff(logits(again), logits(lora, trained)) <= 1e-5
    adapters = peft.apply(loaded, [peft.Adapter(size=4, targets=[r"out/kernel$"])])
    assert {p.rsplit("/", 1)[0] for p in peft.added_paths(adapters)} == outs


def test_merge_of_params_without_the_factors_is_an_error(loaded):
    lora = peft.apply(loaded, [peft.LoRA(rank=2)])
    with pytest.raises(ValueError, match=r"merge: the parameters hold no LoRA factors for .*attention/query"):
        peft.merge(lora, loaded.params)  # the base model's parameters, not the woven model's
