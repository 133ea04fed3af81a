"""Few-shot episodes (exact counts, disjoint, seeded), the per-episode classifiers against hand / scikit-learn
computations, the 95% CI formula, and text zero-shot on a tiny random BERT against a PyTorch + NumPy recomputation."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tljax import fewshot
from tljax import text_zero_shot as tzs

LABELS = np.repeat(np.arange(8), [30, 25, 40, 20, 22, 35, 21, 60])  # 8 classes, 20..60 rows each


def test_episodes_have_exact_counts_and_disjoint_support_and_query():
    eps = fewshot.episodes(LABELS, n_way=5, k_shot=3, n_query=4, count=50, seed=0)
    assert len(eps) == 50 and eps.n_way == 5
    assert eps.classes.shape == (50, 5) and eps.support.shape == (50, 15) and eps.query.shape == (50, 20)
    np.testing.assert_array_equal(eps.support_labels, np.repeat(np.arange(5), 3))
    np.testing.assert_array_equal(eps.query_labels, np.repeat(np.arange(5), 4))
    for c, s, q in zip(eps.classes, eps.support, eps.query, strict=True):
        assert len(set(c)) == 5 and len(set(s) | set(q)) == 15 + 20  # distinct classes, no row used twice
        np.testing.assert_array_equal(LABELS[s], c[eps.support_labels])  # row i*K.. belongs to episode class i
        np.testing.assert_array_equal(LABELS[q], c[eps.query_labels])
    assert len(np.unique(eps.classes)) == 8  # 50 draws reach every class


def test_episodes_are_deterministic_by_seed():
    a, b = (fewshot.episodes(LABELS, 5, 1, 15, 20, seed=3) for _ in range(2))
    c = fewshot.episodes(LABELS, 5, 1, 15, 20, seed=4)
    for field in ("classes", "support", "query"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.support, c.support) and not np.array_equal(a.classes, c.classes)


def test_episodes_draw_only_from_the_pool_and_skip_unlabelled_rows():
    labels = np.concatenate([LABELS, -np.ones(50, int)])
    pool = fewshot.classes_with(labels, 30)
    np.testing.assert_array_equal(pool, [0, 2, 5, 7])
    eps = fewshot.episodes(labels, 3, 5, 20, 30, seed=0, classes=pool)
    assert set(np.unique(eps.classes)) <= {0, 2, 5, 7} and (labels[eps.query] >= 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_way=1), "n_way must be an int >= 2"),
        (dict(k_shot=0), "k_shot must be an int >= 1"),
        (dict(n_query=-1), "n_query must be an int >= 1"),
        (dict(count=0), "count must be an int >= 1"),
        (dict(k_shot=1.5), "k_shot must be an int"),
        (dict(n_way=9), "needs at least 9 classes"),
        (dict(k_shot=10, n_query=15), r"classes \{3: 20, 4: 22, 6: 21\} .* fewer than k_shot \+ n_query = 25"),
    ],
)
def test_bad_sizes_are_clear_errors(kwargs, message):
    args = dict(n_way=5, k_shot=1, n_query=15, count=10) | kwargs
    with pytest.raises(ValueError, match=message) as e:
        fewshot.episodes(LABELS, **args)
    if "fewer than" in message:
        assert "classes=fewshot.classes_with(labels, 25)" in str(e.value)  # says how to fix it


def test_prototype_equals_a_hand_computation():
    support = np.array([[1, 0], [3, 0], [0, 4], [0, 6], [9, 9]], np.float32)  # means (2,0), (0,5), (9,9)
    ys = np.array([0, 0, 1, 1, 2])
    query = np.array([[1, 1], [0, 3], [6, 6], [3, 2.4]], np.float32)
    # squared distances to the means: [2, 17, 128], [13, 4, 117], [52, 37, 18], [6.76, 15.76, 79.56]
    np.testing.assert_array_equal(fewshot.prototype(support, ys, query), [0, 1, 2, 0])
    # cosine: means of the unit rows point at 0, 90 and 45 degrees; the queries at 45, 90, 45 and 38.7
    np.testing.assert_array_equal(fewshot.prototype(support, ys, query, metric="cosine"), [2, 1, 2, 2])


def test_simpleshot_centres_then_normalises():
    x = np.array([[4, 5], [1, 1], [5, 4]], np.float32)
    np.testing.assert_allclose(fewshot.simpleshot(x), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(fewshot.simpleshot(x, center=[1, 1])[[0, 2]], [[0.6, 0.8], [0.8, 0.6]], rtol=1e-6)
    assert np.isfinite(fewshot.simpleshot(x, center=[1, 1])).all()  # the zero row stays zero, not NaN


def test_logistic_matches_sklearn_default_c():
    rng = np.random.RandomState(0)
    support, query = rng.randn(15, 16).astype(np.float32), rng.randn(40, 16).astype(np.float32)  # shapes as below
    ys = np.repeat(np.arange(5), 3)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(support, ys)  # l2=None is C=1
    np.testing.assert_array_equal(fewshot.logistic(support, ys, query), ref.predict(query))


def _separable(seed: int = 0, rows: int = 40, dim: int = 16):
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(6), rows)
    centers = 10 * np.eye(6, dim)
    return (centers[labels] + 0.5 * rng.randn(len(labels), dim)).astype(np.float32), labels


@pytest.mark.parametrize(
    "classifier, options",
    [("prototype", {}), ("prototype", {"metric": "cosine"}), ("knn", {"k": 1}), ("knn", {"k": 3}), ("logistic", {})],
)
def test_separable_features_are_classified_perfectly(classifier, options):
    x, labels = _separable()
    eps = fewshot.episodes(labels, 5, 3, 5, count=20, seed=1)
    accs = fewshot.evaluate(x, eps, classifier, **options)
    np.testing.assert_array_equal(accs, np.ones(20))
    assert fewshot.summary(accs) == {"mean": 1.0, "ci95": 0.0, "std": 0.0, "episodes": 20}


def test_evaluate_scores_restricts_to_the_episode_classes():
    x, labels = _separable()
    scores = x[:, :6] - 100 * (np.arange(6) == 0)  # class 0's own column is pushed down: its queries lose
    eps = fewshot.episodes(labels, 2, 1, 5, count=30, seed=0)
    accs = fewshot.evaluate_scores(scores, eps)
    np.testing.assert_array_equal(accs, [0.5 if 0 in c else 1.0 for c in eps.classes])


def test_confidence_interval_formula():
    accs = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    mean, ci = fewshot.confidence_interval(accs)
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(1.96 * np.sqrt(0.08) / np.sqrt(5))  # population std sqrt(0.08)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        fewshot.confidence_interval(np.zeros((0,)))


def test_unknown_classifier_and_out_of_range_rows():
    x, labels = _separable()
    eps = fewshot.episodes(labels, 5, 1, 2, count=2, seed=0)
    with pytest.raises(ValueError, match="unknown few-shot classifier 'svm'"):
        fewshot.evaluate(x, eps, "svm")
    with pytest.raises(ValueError, match="but x has 10"):
        fewshot.evaluate(x[:10], eps)
    with pytest.raises(ValueError, match="must be \\(rows, dim\\)"):
        fewshot.evaluate(x[:, 0], eps)


# --- text zero-shot ---

WORDS = ["animal", "plant", "food", "time", "a", "word", "about", "kind", "of", "something", "related", "to",
         "definition", "the", "dog", "tree", "bread", "hour", "small", "green", "baked", "sixty"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer whose ids fit the tiny BERT's vocabulary (99)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def test_label_words():
    assert tzs.label_words(["noun.animal", "noun.Tops", "verb.body_care", "plain"]) == [
        "animal", "tops", "body care", "plain"]  # fmt: skip


def test_text_zero_shot_matches_pytorch_and_numpy(tiny_bert_dir, tiny_tokenizer):
    import torch
    from transformers import BertModel

    import tljax.models as tm

    loaded = tm.load_pretrained(tiny_bert_dir)
    names = ["animal", "plant", "food", "time"]
    texts = ["a small dog", "a green tree", "baked bread", "sixty minutes", "the hour", "a word about the dog"]
    classes = tzs.class_embeddings(loaded, tiny_tokenizer, names, max_length=16)
    emb = tzs.embed(loaded, tiny_tokenizer, texts, max_length=16, batch_size=4)  # two batches, the last padded
    predicted = tzs.predict(emb, classes)

    torch_bert = BertModel.from_pretrained(tiny_bert_dir).eval()

    def reference(strings):  # sentence-transformers: mean over real tokens, then L2-normalise
        enc = tiny_tokenizer(strings, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = torch_bert(**enc).last_hidden_state.numpy()
        m = enc["attention_mask"].numpy()[..., None]
        x = (h * m).sum(1) / m.sum(1)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    prompts = reference([t.format(n) for n in names for t in tzs.TEMPLATES]).reshape(4, len(tzs.TEMPLATES), -1)
    ref_classes = prompts.mean(1) / np.linalg.norm(prompts.mean(1), axis=-1, keepdims=True)
    ref_scores = reference(texts) @ ref_classes.T
    np.testing.assert_allclose(emb, reference(texts), atol=1e-5)
    np.testing.assert_allclose(classes, ref_classes, atol=1e-5)
    np.testing.assert_allclose(tzs.scores(emb, classes), ref_scores, atol=1e-5)
    np.testing.assert_array_equal(predicted, ref_scores.argmax(-1))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("pooling, layer", [("cls", None), ("mean", 0), ("cls", 0)])
def test_experiment_zero_shot_pools_class_prompts_like_the_examples(tiny_bert_dir, tiny_tokenizer, monkeypatch,
                                                                      pooling, layer):  # fmt: skip
    """experiments.fewshot's text zero-shot embeds the class prompts with the pooling and layer of the example
    features (probe.pooling / probe.layer): a prompt given as an example is its own class vector."""
    from types import SimpleNamespace

    import tljax.job
    import tljax.models as tm
    from experiments import fewshot as experiment
    from tljax import features
    from tljax.data.pipeline import EvalData
    from tljax.data.text import TextBatcher

    loaded = tm.load_pretrained(tiny_bert_dir)
    names = ["animal", "plant", "food", "time"]
    monkeypatch.setattr(tljax.job, "model_folder", lambda name: tiny_bert_dir)
    monkeypatch.setattr(tm, "load_tokenizer", lambda folder: tiny_tokenizer)
    batches = EvalData([{"text": n, "label": i} for i, n in enumerate(names)], batch_size=4,
                       collate=TextBatcher(tiny_tokenizer, 16, (8, 16)))  # fmt: skip
    source = features.extract(loaded, batches(), layer=layer, pooling=pooling)
    job = SimpleNamespace(
        loaded=loaded, label_names=names, splits=SimpleNamespace(train=SimpleNamespace(kind="text")),
        config=SimpleNamespace(zero_shot=SimpleNamespace(class_names=names, templates=["{}"]),
                               model=SimpleNamespace(name="tiny"), data=SimpleNamespace(max_length=16)),
    )  # fmt: skip
    seen = []
    scores = tzs.scores
    monkeypatch.setattr(tzs, "scores", lambda texts, classes: seen.append(classes) or scores(texts, classes))
    experiment.text_zero_shot(job, source, {})
    np.testing.assert_allclose(seen[0], tzs.normalize(source.x), atol=1e-5)


# --- the experiment, end to end on a tiny BERT (bert-base-uncased's stand-in: real WordPiece vocabulary) ---


def test_experiment_end_to_end(hub_cache, tmp_path):
    """experiments.fewshot on 400 WordNet test definitions: results.json holds, per K, what `fewshot.evaluate` gives
    on the cached features; zero-shot covers the 26 label words; a support-set fine-tune
    (the top block and the head, 2 steps) reports an accuracy over its queries."""
    import json

    from ml_collections import ConfigDict

    from experiments import fewshot as experiment
    from experiments.configs.fewshot import get_config
    from tljax import features

    config = get_config("text")
    config.model.name = "bert-base-uncased"
    config.data.update(train_size=104, validation_size=52, test_size=400, max_length=16)
    config.fewshot.update(shots=[2], n_query=3, episodes=12, n_way=3)
    config.fewshot.finetune = ConfigDict(  # the top block and the head, 2 steps
        {"episodes": 1, "batch_size": 0, "schedule": "surgical", "args": {"block": 1, "steps": 2}}
    )
    results = experiment.run(config, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["fewshot"] == results["fewshot"]

    by_rows = {len(f): f for f in (features.load_features(p)[0] for p in (tmp_path / "features").glob("*.npz"))}
    test, train = by_rows[400], by_rows[104]
    assert len(test) == 400 and results["protocol"]["rows"] == 400
    sets, pool = experiment.episode_sets(config.fewshot, test.labels)
    names = results["protocol"]["classes"]
    assert len(pool) == len(names) and len(names) + len(results["protocol"]["left_out"]) == 26
    x = fewshot.simpleshot(test.x, center=train.x.mean(0))
    for spec in config.fewshot.classifiers:
        options = {k: v for k, v in spec.items() if k != "name"}
        accs = fewshot.evaluate(x, sets[2], spec["name"], **options)
        got = results["fewshot"]["2shot"][experiment.label_of(dict(spec))]
        assert got["mean"] == pytest.approx(accs.mean()) and got["episodes"] == 12
    z = results["zero_shot"]
    assert z["class_names"][:2] == ["tops", "act"] and z["classes"] == 26
    assert 0 <= z["accuracy"] <= 1 and z["episodes"]["2shot"]["episodes"] == 12
    ft = results["finetune"]["2shot"]
    assert ft["episodes"] == 1 and ft["mean"] * 9 == pytest.approx(round(ft["mean"] * 9))  # 9 queries
    assert ft["accuracies"] == [ft["mean"]]
    for label, paired in results["frozen_on_finetuned_episodes"]["2shot"].items():  # the same (first) episode, frozen
        assert paired["episodes"] == 1 and paired["mean"] == results["fewshot"]["2shot"][label]["accuracies"][0]
    assert "the fine-tuned episodes | " in experiment.table(results)
    assert "| 3-way (12 episodes, 3 queries/class) | 2shot |" in experiment.table(results)


def test_clip_image_embeds_as_a_k_shot_probe(hub_cache, tmp_path):
    """The clip variant: episodes over CLIP's projected `image_embeds` (the tiny stand-in's 16 features), the
    logistic classifier fitted per support set, as `fewshot.evaluate` computes it from the cached features."""
    from experiments import fewshot as experiment
    from experiments.configs.fewshot import get_config
    from tljax import features

    config = get_config("clip")
    config.data.update(train_size=32, validation_size=10, test_size=60)
    config.fewshot.update(shots=[1], n_query=2, episodes=4, n_way=3, classifiers=[{"name": "logistic"}])
    results = experiment.run(config, tmp_path)
    assert "zero_shot" not in results and results["protocol"]["feature_dim"] == 16
    by_rows = {len(f): f for f in (features.load_features(p)[0] for p in (tmp_path / "features").glob("*.npz"))}
    test, train = by_rows[60], by_rows[32]  # validation (10 rows) is also carved from fashion_mnist:train
    sets, _ = experiment.episode_sets(config.fewshot, test.labels)
    accs = fewshot.evaluate(fewshot.simpleshot(test.x, center=train.x.mean(0)), sets[1], "logistic")
    assert results["fewshot"]["1shot"]["logistic"]["mean"] == pytest.approx(accs.mean())
