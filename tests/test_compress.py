"""The DKDP loop on the built-in digits: target reached, resume after a kill, the gate, τ adapting."""

from __future__ import annotations

import json

import pytest
import torch

import kdcli.dkdp.compress as C
from kdcli.config.recipe import builtin_recipe_path

FAST = ["teacher.train.epochs=8", "distill.train.epochs=2", "prune.final_epochs=1", "export.enabled=false",
        "device=cpu"]


def run(tmp_path, name="run", extra=()):
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / name,
                                  overrides=[*FAST, *extra])
    return C.compress(recipe, run_dir, device=torch.device("cpu"))


def test_reaches_the_macs_target_and_writes_the_run(tmp_path):
    res = run(tmp_path, extra=["target.max_accuracy_drop=0.05"])
    assert res.student["macs"] <= 0.3 * res.teacher["macs"] * 1.0001
    assert res.target_met and not res.gate_failures
    accepted = [r for r in res.steps if r["accepted"]]
    assert accepted and all(r["tau"] is not None and r["tau"] > 0 for r in accepted)
    # MACs fall step by step towards the target
    ratios = [r["macs_ratio"] for r in accepted]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.3001
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [r["step"] for r in res.steps]
    report = (tmp_path / "run" / "compress_report.md").read_text()
    assert "DKDP steps" in report and "τ" in report


def test_resume_after_a_kill_mid_step_gives_the_clean_result(tmp_path, monkeypatch):
    clean = run(tmp_path, "clean")
    calls = {"n": 0}
    real = C._distil

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # killed during the second step's distillation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_distil", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed")
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["accepted_steps"] == 1 and not state["finished"]
    monkeypatch.setattr(C, "_distil", real)
    recipe = C.resume_recipe(tmp_path / "killed")
    resumed = C.compress(recipe, tmp_path / "killed", device=torch.device("cpu"))
    assert resumed.student["macs"] == clean.student["macs"]
    assert resumed.student["val_accuracy"] == pytest.approx(clean.student["val_accuracy"], abs=1e-9)
    assert [r["tau"] for r in resumed.steps] == pytest.approx([r["tau"] for r in clean.steps])


def test_an_unmet_budget_is_a_gate_failure_with_the_student_kept(tmp_path):
    res = run(tmp_path, extra=["target.macs=0.02", "target.max_accuracy_drop=0.0", "prune.steps=1",
                               "prune.max_retries=0"])
    assert not res.target_met and res.gate_failures
    assert (tmp_path / "run" / "student.kdc").is_file()


def test_tau_backs_off_after_a_step_over_budget(tmp_path):
    # A budget of zero makes the first, large step fail; the next attempt must aim at a smaller cut.
    res = run(tmp_path, extra=["target.macs=0.1", "target.max_accuracy_drop=0.0", "prune.steps=1",
                               "prune.max_retries=2"])
    first, second = res.steps[0], res.steps[1]
    assert not first["accepted"] and "undone" in first["reason"]
    assert second["target_macs"] > first["target_macs"]
    assert second["macs"] > first["macs"]  # the retry really cuts less, not the same plan again
    # retries spent, the schedule goes on in steps no larger than half the undone cut (none held),
    # and only the last step the schedule may take (max_steps 3 x 1) aims at the target: the
    # student meets it, marked forced, and only accuracy fails
    assert sum(not r["accepted"] for r in res.steps) == 2 and len(res.steps) == 5
    floor = (first["macs"] / res.teacher["macs"]) ** 0.5
    before = res.teacher["macs"]
    for r in res.steps[1:-1]:
        assert r["target_macs"] >= before * floor * (1 - 1e-9)
        before = r["macs"] if r["accepted"] else before
    assert res.steps[-1]["accepted"] and res.steps[-1]["target_macs"] == pytest.approx(first["target_macs"])
    assert res.steps[-1]["forced"] and "largest step that held" in res.steps[-1]["forced"]
    assert res.student["macs"] <= 0.1 * res.teacher["macs"] * 1.0001
    assert res.gate_failures and all("accuracy drop" in f for f in res.gate_failures)


def test_declared_student_with_all_to_all_vid_reports_lambda(tmp_path):
    # A student of another depth (one hidden layer against the teacher's two) learns from every
    # teacher layer; the λ it learned lands in the result and as a heatmap in the HTML report.
    res = run(tmp_path, extra=[
        "student={model: mlp, model_args: {hidden: [48]}}",
        "distill.losses=[{kind: kd, temperature: 4, weight: 0.9}, {kind: ce, weight: 0.1}, "
        "{kind: vid, pairing: all-to-all, lambda: learned, weight: 0.1}]",
        "distill.train.epochs=6", "target.max_accuracy_drop=1.0"])
    assert not res.steps  # pure distillation: no pruning step
    lam = res.vid_lambda
    assert lam is not None and lam["learned"]
    nt, ns = len(lam["teacher_layers"]), len(lam["student_layers"])
    assert nt >= 2 and ns >= 1 and len(lam["matrix"]) == nt and all(len(row) == ns for row in lam["matrix"])
    for j in range(ns):
        assert sum(row[j] for row in lam["matrix"]) == pytest.approx(1.0, abs=1e-3)
    assert any(abs(v - 1 / nt) > 0.01 for row in lam["matrix"] for v in row)  # it moved from uniform (0.52 / 0.48)
    report = json.loads((tmp_path / "run" / "compress_report.json").read_text())
    assert report["vid_lambda"]["matrix"] == lam["matrix"]
    page = (tmp_path / "run" / "compress_report.html").read_text()
    assert "VID layer weights λ (learned)" in page and "λ (teacher × student)" in page
    assert "VID layer weights" in (tmp_path / "run" / "compress_report.md").read_text()
    # without a VID term there is no λ, and the report says nothing of it
    plain = run(tmp_path, "plain", extra=["target.max_accuracy_drop=0.05"])
    assert plain.vid_lambda is None
    assert "VID layer weights" not in (tmp_path / "plain" / "compress_report.html").read_text()


TRAIN_TEACHER = ["distill.train_teacher={epochs: 2, lr: 0.01, kd_weight: 1.0}", "target.max_accuracy_drop=0.05"]


def _kl_to(model, other, x) -> float:
    with torch.no_grad():
        p = torch.log_softmax(model(x) / 4, 1)
        q = torch.log_softmax(other(x) / 4, 1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_train_teacher_between_steps_moves_the_teacher_toward_the_student(tmp_path):
    from kdcli.models.file import load_model_file
    from kdcli.data.loader import load_data

    res = run(tmp_path, extra=TRAIN_TEACHER)
    kept = [r for r in res.steps if r["accepted"]]
    assert kept and all(r["teacher_val_accuracy"] is not None for r in kept)
    assert all(r["teacher_val_accuracy"] is None for r in res.steps if not r["accepted"])
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["teacher_file"] == f"steps/teacher_{kept[-1]['step']:03d}.kdc"
    original, _ = load_model_file(run_dir / "teacher.kdc")
    tuned, _ = load_model_file(run_dir / state["teacher_file"])
    student, _ = load_model_file(run_dir / "student.kdc")
    for m in (original, tuned, student):
        m.eval()
    recipe = C.resume_recipe(run_dir)
    x, y = load_data(recipe.data, base_dir=recipe.base_dir, seed=recipe.seed).eval_tensors("val", torch.device("cpu"))
    # the fine-tuned teacher changed, and KD toward the student brought it closer to the student
    assert any(not torch.equal(a, b) for a, b in zip(original.state_dict().values(), tuned.state_dict().values()))
    assert _kl_to(tuned, student, x) < _kl_to(original, student, x)
    # the budget and the report still measure the original teacher
    from kdcli.train.loop import evaluate, tensor_batches

    assert res.teacher["val_accuracy"] == pytest.approx(evaluate(original, tensor_batches(x, y))["accuracy"])


def test_resume_with_train_teacher_gives_the_clean_result(tmp_path, monkeypatch):
    clean = run(tmp_path, "clean", extra=TRAIN_TEACHER)
    calls = {"n": 0}
    real = C._distil

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # step 1's distillation, its teacher fine-tuning, then killed in step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_distil", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", extra=TRAIN_TEACHER)
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["teacher_file"] == "steps/teacher_001.kdc"
    monkeypatch.setattr(C, "_distil", real)
    resumed = C.compress(C.resume_recipe(tmp_path / "killed"), tmp_path / "killed", device=torch.device("cpu"))
    assert resumed.student["macs"] == clean.student["macs"]
    assert resumed.student["val_accuracy"] == pytest.approx(clean.student["val_accuracy"], abs=1e-9)
    assert [r["teacher_val_accuracy"] for r in resumed.steps] == pytest.approx(
        [r["teacher_val_accuracy"] for r in clean.steps], nan_ok=True)


# ----------------------------------------------------------------------------- the target


def test_target_resolves_fractions_and_counts_against_the_teacher():
    from kdcli.config.recipe import TargetSpec
    from kdcli.dkdp.target import Target

    t = Target.of(TargetSpec(macs=0.5, params=3000, max_accuracy_drop=0.01), teacher_macs=10_000,
                  teacher_params=8_000, teacher_accuracy=0.90)
    assert (t.macs, t.params) == (5_000.0, 3000.0) and t.asks_resources
    assert t.met(5_000, 3_000) and t.met(5_000.4, 3_000)  # the 1e-4 slack for rounding
    assert not t.met(5_001, 3_000) and not t.met(5_000, 3_001)
    assert t.unmet(6_000, 3_500) == "target not met: MACs 0.600 of teacher > target 0.500; params 3,500 > target 3,000"
    assert t.failures(5_000, 3_000, None, 0.89) == []  # a drop of exactly the budget passes
    assert t.failures(5_000, 3_000, None, 0.8899) == ["accuracy drop 1.01 pt > max_accuracy_drop 1.00 pt"]
    assert not Target.of(TargetSpec(), 10, 10, 0.5).asks_resources


def test_target_aims_on_a_geometric_path_to_the_macs():
    from kdcli.config.recipe import TargetSpec
    from kdcli.dkdp.target import Target

    t = Target.of(TargetSpec(macs=0.25), teacher_macs=1_000, teacher_params=10, teacher_accuracy=0.9)
    # two steps left at aggressiveness 1: halfway on the log scale, sqrt(1000 * 250) = 500
    assert t.next_macs(1_000, steps_left=2, aggressiveness=1.0) == pytest.approx(500.0)
    assert t.next_macs(1_000, steps_left=2, aggressiveness=2.0) == pytest.approx(250.0)  # all the way
    assert t.next_macs(1_000, steps_left=1, aggressiveness=0.5) == pytest.approx(500.0)
    assert t.next_macs(200, steps_left=3, aggressiveness=1.0) == 200  # already below: no cut
    no_macs = Target.of(TargetSpec(params=5), teacher_macs=1_000, teacher_params=10, teacher_accuracy=0.9)
    assert no_macs.next_macs(1_000, steps_left=3, aggressiveness=1.0) == pytest.approx(700.0)  # a fixed 0.7 cut


# ----------------------------------------------------------------------------- distil() without a recipe


def test_distil_needs_no_recipe_and_carries_the_teacher_cache(tmp_path):
    from kdcli.config.data import DataSpec
    from kdcli.config.train import TrainSpec
    from kdcli.data.loader import load_data
    from kdcli.distill.distil import distil
    from kdcli.models import build_model
    from kdcli.train.loop import evaluate, fit, tensor_batches

    data = load_data(DataSpec(), base_dir=tmp_path, seed=0)
    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [64]}, input_shape=data.input_shape, num_classes=10)
    fit(teacher, data.loader("train", train=True, seed=0), TrainSpec(epochs=8, lr=0.05))
    teacher.eval()
    torch.manual_seed(1)
    student = build_model("mlp", {"hidden": [8]}, input_shape=data.input_shape, num_classes=10)
    before = evaluate(student, tensor_batches(*data.eval_tensors("val")))["accuracy"]
    res = distil(teacher, student, [{"kind": "kd", "temperature": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1}],
                 data, TrainSpec(epochs=3, lr=0.05), seed=0)
    assert len(res.history) == 3 and res.lambda_report is None
    assert res.history[-1]["val_accuracy"] > before + 0.3  # it learned from the teacher
    assert res.cache is not None and bool(res.cache.filled.all())  # filled in sample order up front
    again = distil(teacher, student, [{"kind": "kd", "temperature": 4}], data, TrainSpec(epochs=1, lr=0.01),
                   cache=res.cache, seed=1)
    assert again.cache is res.cache
    with pytest.raises(Exception, match="kind"):
        distil(teacher, student, [{"kind": "nope"}], data, TrainSpec(epochs=1))


def test_after_an_undone_step_no_step_cuts_more_than_the_largest_that_held(tmp_path, monkeypatch):
    """Issue #12 item 5: a scripted accuracy that fails any step cutting more than 40 % of the
    MACs. The first planned step (to sqrt(0.2) = 0.45 of the MACs) is undone; from then on no
    attempt aims at a larger cut than the largest that held, and the schedule grows past
    steps + max_retries attempts instead of cutting to the target at once."""
    real_attempt = C.Loop.attempt

    def scripted(self, macs, params):
        a = real_attempt(self, macs, params)
        cut = 1 - a.new_macs / a.macs
        a.accuracy = self.ctx.target.teacher_accuracy - (0.05 if cut > 0.4 else 0.001)
        return a

    monkeypatch.setattr(C.Loop, "attempt", scripted)
    # round_to 1: the final student's accuracy within the budget was measured at those widths
    res = run(tmp_path, extra=["target.macs=0.2", "target.max_accuracy_drop=0.01", "prune.steps=2",
                               "prune.max_retries=2", "distill.train.epochs=1", "prune.round_to=1"])
    steps = res.steps
    assert not steps[0]["accepted"] and "undone" in steps[0]["reason"]
    assert len(steps) > 2 + 2  # grew beyond steps + max_retries
    macs_before = res.teacher["macs"]
    held = []
    for r in steps:
        aim_ratio = r["target_macs"] / macs_before
        if held:
            assert aim_ratio >= min(held) - 1e-9, (r, held)  # never a larger cut than one that held
        if r["accepted"]:
            held.append(r["macs"] / macs_before)
            macs_before = r["macs"]
    assert all(r["accepted"] for r in steps[1:]) and not any(r["forced"] for r in steps)
    assert res.target_met and res.student["macs"] <= 0.2 * res.teacher["macs"] * 1.0001


def test_the_last_step_the_schedule_may_take_is_forced_to_the_target_and_says_so(tmp_path, monkeypatch):
    real_attempt = C.Loop.attempt

    def scripted(self, macs, params):
        a = real_attempt(self, macs, params)
        a.accuracy = self.ctx.target.teacher_accuracy - (0.05 if 1 - a.new_macs / a.macs > 0.4 else 0.001)
        return a

    monkeypatch.setattr(C.Loop, "attempt", scripted)
    res = run(tmp_path, extra=["target.macs=0.1", "prune.steps=2", "prune.max_steps=3", "prune.max_retries=1",
                               "distill.train.epochs=1"])
    last = res.steps[-1]
    assert last["accepted"] and last["forced"] and "forced" in last["forced"]
    assert res.student["macs"] <= 0.1 * res.teacher["macs"] * 1.0001
    assert sum(r["accepted"] for r in res.steps) == 3


def test_a_step_whose_plan_removes_nothing_ends_the_pruning(tmp_path, monkeypatch, capsys):
    # round_to wider than every group: no plan can remove a block, so no step can prune; the loop
    # used to distil again for every step the schedule allowed (12 here) without changing the student
    calls = {"n": 0}
    real = C._distil

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "_distil", counting)
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / "run",
                                  overrides=[*FAST, "prune.round_to=1024"])
    res = C.compress(recipe, run_dir, device=torch.device("cpu"), reporter=C.Reporter(quiet=False))
    assert calls["n"] == 1  # the final distillation only, no step's
    assert res.steps == [] and not res.target_met
    assert res.student["macs"] == res.teacher["macs"]
    assert "the plan removes nothing" in capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["pruning_done"] and state["finished"]
    assert any("the plan removes nothing" in w for w in res.data["warnings"])


def test_the_early_stop_warning_survives_a_resume(tmp_path, monkeypatch):
    # killed in the final distillation, after the loop stopped pruning: the resumed run's reports
    # still carry the warning (the state says pruning is done, so no step says it again)
    real = C._distil

    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_distil", dying)
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / "run",
                                  overrides=[*FAST, "prune.round_to=1024"])
    with pytest.raises(KeyboardInterrupt):
        C.compress(recipe, run_dir, device=torch.device("cpu"))
    assert json.loads((run_dir / "state.json").read_text())["pruning_done"]
    monkeypatch.setattr(C, "_distil", real)
    res = C.compress(C.resume_recipe(run_dir), run_dir, device=torch.device("cpu"))
    assert sum("the plan removes nothing" in w for w in res.data["warnings"]) == 1
    assert "the plan removes nothing" in (run_dir / "compress_report.md").read_text()
