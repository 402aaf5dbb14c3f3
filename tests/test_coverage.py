"""Coverage of a top-k store (first_kd.coverage): the summary `cache` records, the --probe-k curve, what
`inspect` shows and draws.

The maths against numpy oracles on constructed inputs; then `first-kd cache` on a tiny Llama teacher: the
recorded summary against numpy over the stored log-probs, resume after SIGKILL, the probe curve against a
plain full forward, the store with --probe-k against the store without it, the probe alone on a complete
store, `inspect`'s suggestion and PNG, and stores written before coverage was recorded.
"""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
import zarr

from first_kd import coverage as C
from first_kd import store as S
from first_kd.cli import main

from helpers import build_peaked_model, is_png, pr_records, run_cli, small_cache_args, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBE = ("--probe-k", "24", "--probe-positions", "60")


def oracle_quantile(values, q):
    """The inverted-CDF quantile written out: the r-th smallest value, r = max(1, ceil(q/100 * n))."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    return ordered[max(1, int(np.ceil(q / 100 * len(ordered)))) - 1]


def assert_summary_matches(summary, logprobs):
    """A coverage summary against numpy over the same log-probs [N, k]."""
    mass = np.clip(np.exp(np.asarray(logprobs, dtype=np.float64)).sum(axis=1), 0, 1)
    assert summary["method"] == C.SUMMARY_METHOD and summary["n_positions"] == len(mass)
    assert summary["k"] == np.asarray(logprobs).shape[1]
    assert summary["mean"] == pytest.approx(mass.mean(), rel=1e-12)
    assert summary["min"] == mass.min() and summary["max"] == mass.max()
    np.testing.assert_array_equal(summary["histogram"]["counts"], np.histogram(mass, np.linspace(0, 1, 21))[0])
    np.testing.assert_allclose(summary["histogram"]["edges"], np.linspace(0, 1, 21))
    assert list(summary["quantiles"]) == ["p1", "p5", "p10", "p25", "p50", "p75", "p90"]
    for q in C.QUANTILES:
        exact = np.quantile(mass, q / 100, method="inverted_cdf")
        assert exact == oracle_quantile(mass, q)
        # never below the exact quantile, at most the resolution above it
        assert exact <= summary["quantiles"][f"p{q}"] <= exact + 1e-5 + 1e-12, q


# ----------------------------------------------------------------------------------------------
# the maths


def random_logprobs(n, k, seed=0, vocab=200, alpha=0.3):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(vocab, alpha), size=n)
    return np.log(-np.sort(-probs, axis=1)[:, :k])


def test_summary_equals_numpy_oracle_and_chunks_do_not_matter():
    lp = random_logprobs(1000, 5)
    summary = C.topk_mass_summary(lp)
    assert_summary_matches(summary, lp)
    acc = C.MassAccumulator()
    for lo in range(0, 1000, 64):  # a store read chunk by chunk
        acc.add(lp[lo: lo + 64])
    chunked = acc.summary()
    assert chunked["mean"] == pytest.approx(summary["mean"], rel=1e-14)
    assert {**chunked, "mean": 0} == {**summary, "mean": 0}


def test_quantiles_and_histogram_on_constructed_masses():
    # masses 0.005, 0.015, ..., 0.995 (one column, so the mass is the probability itself)
    mass = (np.arange(100) + 0.5) / 100
    summary = C.topk_mass_summary(np.log(mass)[:, None])
    assert summary["histogram"]["counts"] == [5] * 20
    for q, rank in zip(C.QUANTILES, (1, 5, 10, 25, 50, 75, 90)):
        assert mass[rank - 1] <= summary["quantiles"][f"p{q}"] <= mass[rank - 1] + 1e-5 + 1e-12
    assert summary["mean"] == pytest.approx(0.5) and summary["min"] == pytest.approx(0.005)
    # the last bin is [0.95, 1], the mass 1 included; fp16 rounding above 1 is clipped to 1
    edge = C.topk_mass_summary(np.log([[0.9501], [1.0], [0.9499], [0.5]]) + [[0], [1e-3], [0], [0]])
    assert edge["histogram"]["counts"][-1] == 2 and edge["histogram"]["counts"][18] == 1
    assert edge["histogram"]["counts"][10] == 1
    assert edge["max"] == 1.0 and edge["quantiles"]["p90"] == 1.0
    # every position alike (a peaked teacher): every quantile is that mass, not a bin edge above it
    same = C.topk_mass_summary(np.log(np.full((50, 2), 0.41234)))
    assert set(same["quantiles"].values()) == {same["max"]} and same["max"] == pytest.approx(0.82468)
    with pytest.raises(ValueError, match="shape"):
        C.topk_mass_summary(np.zeros(5))
    with pytest.raises(ValueError, match="NaN or"):
        C.topk_mass_summary(np.array([[np.nan]]))
    # -inf is a padding column of a variable-k row: probability 0
    padded = C.topk_mass_summary(np.array([[np.log(0.5), np.log(0.25)], [np.log(0.9), -np.inf]]))
    assert padded["mean"] == pytest.approx(0.825) and padded["min"] == pytest.approx(0.75)


def test_top_p_counts_are_the_smallest_prefix_reaching_p():
    lp = np.log([[0.5, 0.3, 0.1, 0.05], [0.96, 0.02, 0.01, 0.005], [0.4, 0.3, 0.2, 0.05]])
    np.testing.assert_array_equal(C.top_p_counts(lp, 0.75), [2, 1, 3])
    np.testing.assert_array_equal(C.top_p_counts(lp, 0.97), [4, 2, 4])  # rows 0 and 2 never reach it: the cap
    np.testing.assert_array_equal(C.top_p_counts(lp, 0.45), [1, 1, 2])
    with pytest.raises(ValueError, match="p must be"):
        C.top_p_counts(lp, 0.0)


def test_mass_curve_equals_oracle():
    lp = random_logprobs(300, 12, seed=3)
    curve = C.mass_curve(lp)
    cum = np.minimum(np.cumsum(np.exp(lp), axis=1), 1)
    assert curve["k"] == 12 and curve["n_positions"] == 300
    np.testing.assert_allclose(curve["mean"], cum.mean(0), atol=1e-6)
    np.testing.assert_allclose(curve["min"], cum.min(0), atol=1e-6)
    for q in C.QUANTILES:
        expected = [oracle_quantile(cum[:, j], q) for j in range(12)]
        np.testing.assert_allclose(curve["quantiles"][f"p{q}"], expected, atol=1e-6)
    # the curve at j = k is the top-k summary of the same rows
    assert curve["mean"][4] == pytest.approx(C.topk_mass_summary(lp[:, :5])["mean"], abs=1e-6)


def test_suggest_k_and_verdict():
    curve = {"k": 6, "mean": [0.5, 0.7, 0.9, 0.95, 0.97, 0.99],
             "quantiles": {"p10": [0.1, 0.3, 0.5, 0.8, 0.94, 0.96]}}
    assert C.suggest_k(curve, 0.95) == {"target": 0.95, "k_mean": 4, "k_p10": 6}
    assert C.suggest_k(curve, 0.99) == {"target": 0.99, "k_mean": 6, "k_p10": None}
    assert C.suggest_k(curve, 0.4) == {"target": 0.4, "k_mean": 1, "k_p10": 3}
    summary = {"k": 3, "mean": 0.9, "quantiles": {"p10": 0.5}}
    verdict = C.coverage_verdict(summary, curve, 0.95)
    assert verdict["reaches_mean"] is False and verdict["reaches_p10"] is False
    assert (verdict["probe_k"], verdict["k_mean"], verdict["k_p10"]) == (6, 4, 6)
    assert C.coverage_verdict(summary, None, 0.9)["reaches_mean"] is True
    assert C.coverage_verdict(summary, None, 0.9)["k_mean"] is None


def test_probe_sequences_takes_whole_sequences_in_a_seeded_order():
    n_targets = np.array([5, 1, 7, 3, 2, 9, 4])
    indices, take = C.probe_sequences(n_targets, 12)
    assert take.sum() == 12 and np.all(np.diff(indices) > 0)
    assert np.all(take[:-1] <= n_targets[indices[:-1]]) and np.all(take >= 1)
    order = np.random.default_rng(C.PROBE_SEED).permutation(7)
    held = np.cumsum(n_targets[order])
    m = int(np.argmax(held >= 12)) + 1  # whole sequences in the seeded order until 12 positions
    assert sorted(indices.tolist()) == sorted(order[:m].tolist())
    cut = order[m - 1]  # only the last one drawn is cut short
    assert all(t == n_targets[i] for i, t in zip(indices, take) if i != cut)
    again = C.probe_sequences(n_targets, 12)
    np.testing.assert_array_equal(again[0], indices) and np.testing.assert_array_equal(again[1], take)
    every, take_all = C.probe_sequences(n_targets, 1000)  # fewer positions than asked: all of them
    assert every.tolist() == list(range(7)) and take_all.tolist() == n_targets.tolist()


# ----------------------------------------------------------------------------------------------
# stores built from arrays (no teacher)

VOCAB, K = 100, 5


def build_store(path, n=30, complete=True, seed=0):
    """A small prompt/response store filled with sorted random top-k rows; returns the log-probs written."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(4, 20))
        rows.append({"id": f"ex-{i}", "input_ids": rng.integers(0, VOCAB, length).tolist(),
                     "target_start": int(rng.integers(1, length)), "answer_index": -1, "n_choices": 0})
    lengths = np.array([len(r["input_ids"]) for r in rows])
    starts = np.array([r["target_start"] for r in rows])
    plan = S.Plan(n, int(lengths.sum()), int((lengths - starts).sum()), K, 32)
    attrs = {"tokenizer": {"sha256": "0" * 64, "size": VOCAB, "special_token_ids": {}, "class": "Fake"},
             "data": {"format": "prompt-response"}, "max_length": 64, "teacher": {"name": "fake"}}
    group = S.create_store(path, datasets.Dataset.from_list(rows), plan, attrs, VOCAB)
    probs = rng.dirichlet(np.full(VOCAB, 0.3), size=plan.n_positions)
    ids = np.argsort(-probs, axis=1)[:, :K]
    logprobs = np.log(np.take_along_axis(probs, ids, axis=1)).astype(np.float32)
    for unit in range(plan.n_units):
        lo, hi = S.unit_rows(group, unit)
        S.write_unit(group, unit, ids[lo:hi], logprobs[lo:hi])
    if complete:
        S.mark_complete(group, {"max_token_id": VOCAB - 1})
    return zarr.open_group(str(path), mode="r")["topk_logprobs"][:]


def test_old_store_without_coverage_is_measured_by_inspect(tmp_path, capsys):
    stored = build_store(tmp_path / "s.zarr")  # written as before this change: no `coverage` attribute
    assert "coverage" not in S.open_store(tmp_path / "s.zarr").attrs
    assert main(["inspect", str(tmp_path / "s.zarr"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["coverage_recorded"] is False and summary["coverage_probe"] is None
    assert_summary_matches(summary["coverage"], stored)
    assert summary["mean_topk_mass"] == summary["coverage"]["mean"]
    assert summary["coverage_verdict"]["target"] == 0.95 and summary["coverage_verdict"]["k_mean"] is None
    plot = tmp_path / "plots" / "cov.png"
    assert main(["inspect", str(tmp_path / "s.zarr"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "measured now" in out and "--probe-k" in out and is_png(plot)
    # what `cache` records for it is the same summary
    assert S.coverage_summary(zarr.open_group(str(tmp_path / "s.zarr"))) == summary["coverage"]


def test_recorded_coverage_is_checked_against_the_arrays(tmp_path):
    build_store(tmp_path / "s.zarr")
    good = S.coverage_summary(zarr.open_group(str(tmp_path / "s.zarr")))
    S.update_attrs(tmp_path / "s.zarr", {"coverage": good})
    assert S.verify(tmp_path / "s.zarr")["coverage_recorded"] is True
    S.update_attrs(tmp_path / "s.zarr", {"coverage": {**good, "mean": good["mean"] + 0.01}})
    with pytest.raises(S.DamagedStore, match="recorded coverage"):
        S.verify(tmp_path / "s.zarr")


def test_inspect_bad_options_are_one_line_and_touch_nothing(tmp_path, capsys):
    build_store(tmp_path / "s.zarr")
    before = {p: p.read_bytes() for p in sorted((tmp_path / "s.zarr").rglob("*")) if p.is_file()}
    for args, needle in ((["--coverage", "1.5"], "--coverage"), (["--coverage", "0"], "--coverage"),
                         (["--plot", str(tmp_path / "s.zarr" / "cov.png")], "inside the store")):
        assert main(["inspect", str(tmp_path / "s.zarr"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "s.zarr").rglob("*")) if p.is_file()} == before
    # an incomplete store has no coverage yet: no plot, and inspect says why
    build_store(tmp_path / "part.zarr", complete=False)
    assert main(["inspect", str(tmp_path / "part.zarr"), "--plot", str(tmp_path / "p.png")]) == 1
    assert "incomplete" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------------------------
# `first-kd cache` on a tiny teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with a moderately scaled head: its mass is spread over tens of tokens, so the probe's
    curve climbs over j = 1..24 rather than sitting at 1."""
    return str(build_peaked_model(tmp_path_factory.mktemp("teacher") / "model", tiny_tokenizer, scale=8.0,
                                  hidden_size=64, num_layers=2))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pr.jsonl", pr_records(30))


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("plain") / "s.zarr"
    assert main(small_cache_args(teacher_dir, data_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def probed_store(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("probed") / "s.zarr"
    assert main(small_cache_args(teacher_dir, data_file, out, *PROBE)) == 0
    return out


def arrays(path):
    return {name: arr[:] for name, arr in zarr.open_group(str(path), mode="r").arrays()}


def attributes(path):
    return dict(zarr.open_group(str(path), mode="r").attrs)


def test_cache_records_the_coverage_of_what_it_stored(plain_store):
    attrs = attributes(plain_store)
    assert_summary_matches(attrs["coverage"], arrays(plain_store)["topk_logprobs"])
    assert attrs["coverage"]["k"] == 5 and "coverage_probe" not in attrs
    assert S.verify(plain_store)["coverage_recorded"] is True


def test_probe_does_not_change_the_store(plain_store, probed_store):
    plain, probed = arrays(plain_store), arrays(probed_store)
    assert plain.keys() == probed.keys()
    for name in plain:
        np.testing.assert_array_equal(plain[name], probed[name], err_msg=name)
        assert plain[name].dtype == probed[name].dtype
    a, b = attributes(plain_store), attributes(probed_store)
    assert b.pop("coverage_probe") and "coverage_probe" not in a
    a.pop("finished_at"), b.pop("finished_at")
    assert a == b  # the attributes too, the probe's record aside


def test_probe_curve_equals_a_plain_full_forward(probed_store, teacher_dir):
    from transformers import AutoModelForCausalLM

    probe = attributes(probed_store)["coverage_probe"]
    assert (probe["k"], probe["positions"], probe["seed"], probe["n_positions"]) == (24, 60, C.PROBE_SEED, 60)
    store = S.open_store(probed_store)
    indices, take = C.probe_sequences(np.diff(store.group["pos_offsets"][:]), 60)
    assert probe["n_sequences"] == len(indices)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    rows = []
    for i, n in zip(indices, take):
        rec = store.read(int(i))
        with torch.no_grad():
            logits = model(torch.from_numpy(rec["input_ids"])[None]).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)[torch.from_numpy(rec["target_positions"][:n])]
        top = torch.sort(logprobs, dim=-1, descending=True).values[:, :24]
        rows.append(torch.cumsum(top.double().exp(), dim=-1).clamp(max=1).numpy())
    cum = np.concatenate(rows)  # [60, 24]: the top-j mass of every probed position
    np.testing.assert_allclose(probe["mean"], cum.mean(0), atol=1e-5)
    np.testing.assert_allclose(probe["min"], cum.min(0), atol=1e-5)
    for q in C.QUANTILES:
        np.testing.assert_allclose(probe["quantiles"][f"p{q}"], [oracle_quantile(cum[:, j], q) for j in range(24)],
                                   atol=1e-5)
    assert np.all(np.diff(probe["mean"]) > 0) and probe["mean"][-1] > probe["mean"][4]


@pytest.mark.parametrize("crash_at", ["unit-rows:1", "before-complete"])
def test_resume_after_kill_records_the_same_coverage(tmp_path, teacher_dir, data_file, probed_store, crash_at):
    out = tmp_path / "s.zarr"
    args = small_cache_args(teacher_dir, data_file, out, *PROBE)
    killed = run_cli(args, env={"FIRST_KD_CRASH_AT": crash_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "probe: mean top-j mass reaches" in resumed.stdout
    got, want = attributes(out), attributes(probed_store)
    assert got["coverage"] == want["coverage"]
    assert got["coverage_probe"] == want["coverage_probe"]


def test_probe_alone_on_a_complete_store(tmp_path, plain_store, probed_store, teacher_dir, data_file, capsys,
                                         monkeypatch):
    import first_kd.commands.cache as cache_module

    out = tmp_path / "s.zarr"
    shutil.copytree(plain_store, out)
    S.update_attrs(out, {}, remove=("coverage",))  # as written before coverage was recorded
    before = arrays(out), attributes(out)
    assert main(small_cache_args(teacher_dir, data_file, out, *PROBE)) == 0
    assert "probing the teacher's top-24 mass on 60 positions" in capsys.readouterr().out
    after = attributes(out)
    assert after.pop("coverage_probe") == attributes(probed_store)["coverage_probe"]
    assert after.pop("coverage") == attributes(plain_store)["coverage"]  # an old store gets its summary too
    assert after == before[1]
    for name, values in arrays(out).items():
        np.testing.assert_array_equal(values, before[0][name], err_msg=name)
    # the same probe again, or no probe at all: nothing to do, the teacher is not loaded
    meta = (out / "zarr.json").read_bytes()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded for a no-op")

    monkeypatch.setattr(cache_module, "load_model", no_teacher)
    assert main(small_cache_args(teacher_dir, data_file, out, *PROBE)) == 0
    assert main(small_cache_args(teacher_dir, data_file, out)) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "zarr.json").read_bytes() == meta


def test_bad_probe_options_are_one_line_and_leave_the_store(tmp_path, plain_store, teacher_dir, data_file, capsys):
    out = tmp_path / "s.zarr"
    shutil.copytree(plain_store, out)
    meta = (out / "zarr.json").read_bytes()
    cases = ((("--probe-k", "5"), "larger than the store's width"), (("--probe-k", "5000"), "at most 1024"),
             (("--probe-k", "16", "--probe-positions", "0"), "--probe-positions"),
             (("--probe-k", "16", "--engine", "vllm"), "hf engine only"),
             (("--probe-k", "1000"), "larger than the teacher's vocabulary"))
    for extra, needle in cases:
        assert main(small_cache_args(teacher_dir, data_file, out, *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert (out / "zarr.json").read_bytes() == meta
    # a fresh pass with a --probe-k above the vocabulary stops before writing anything
    assert main(small_cache_args(teacher_dir, data_file, tmp_path / "new.zarr", "--probe-k", "1000")) == 2
    assert "vocabulary" in capsys.readouterr().err and not (tmp_path / "new.zarr").exists()


def test_inspect_shows_coverage_suggests_k_and_draws_it(tmp_path, probed_store, capsys):
    probe = attributes(probed_store)["coverage_probe"]
    target = round(probe["mean"][11], 4)  # the mean top-12 mass: the smallest j reaching it is 12 (or less)
    expected = C.first_reaching(probe["mean"], target)
    plot = tmp_path / "coverage.png"
    assert main(["inspect", str(probed_store), "--coverage", str(target), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "top-5 mass: mean" in lines["coverage"] and "measured now" not in lines["coverage"]
    assert "top-j mass on 60 positions" in lines["probe"] and "j=24" in lines["probe"]
    assert lines["suggest"].startswith(f"suggest    k={expected} keeps {target:g} of the teacher's mass on average")
    assert is_png(plot) and plot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(plot) as image:  # a whole, decodable PNG, wide enough for both panels
        image.load()
        assert image.size[0] > image.size[1]
    assert main(["inspect", str(probed_store), "--json", "--coverage", str(target)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["coverage_verdict"]["k_mean"] == expected and summary["coverage_probe"] == probe
    # unreachable within the probe: say so and how to look further
    assert main(["inspect", str(probed_store), "--coverage", "1"]) == 0
    assert "no k <= 24 keeps 1 of the teacher's mass" in capsys.readouterr().out
