"""Fault sweep: every case of every module in bench/faults/ that defines `cases(workdir)`, run through the CLI in
this process, each outcome classified:

* clear error: a non-zero exit and exactly one stderr line, starting with "error:" and naming everything the case
  says it must (the field, file, tensor or argument it broke);
* correct result: a zero exit and the stdout the case's check accepts (the reference model's result);
* traceback: an exception escaped `main` (or it printed a traceback);
* silently wrong: a zero exit where an error was due, or a result the check refuses;
* unclear error: a non-zero exit whose stderr is not one line naming what was broken.

    python bench/fault_sweep.py [--only PREFIX] [--out bench/results/fault-sweep.json] [--show N]

Before the cases run, the pristine tiny checkpoint's logits are compared with transformers' model of the same
folder (when transformers is installed): the "correct result" of the load cases is that checkpoint's result.
Everything the cases write (GGUF conversions included) stays in a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from llmdrop_rt.cli import main  # noqa: E402
from llmdrop_rt.io.publish import write_json  # noqa: E402

OUTCOMES = ("clear error", "correct result", "unclear error", "traceback", "silently wrong")


def case_modules():
    """Every module of bench/faults/ that defines `cases`."""
    for path in sorted((BENCH / "faults").glob("*.py")):
        module = importlib.import_module(f"faults.{path.stem}")
        if hasattr(module, "cases"):
            yield path.stem, module


def run_cli(argv):
    """(exit status, stdout, stderr, traceback text or None) of `python -m llmdrop_rt argv`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    status, escaped = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - any escape is the outcome being measured
            escaped = traceback.format_exc()
            status = 1
    return status, out.getvalue(), err.getvalue(), escaped


def classify(case, status, stdout, stderr, escaped) -> tuple[str, str]:
    """(outcome, the line that decided it)."""
    if escaped is not None or "Traceback (most recent call last)" in stderr:
        return "traceback", (escaped or stderr).strip().splitlines()[-1]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if case.expect == "error":
        if status == 0:
            return "silently wrong", f"exit 0: {stdout.strip()[:120]!r}"
        clear = len(lines) == 1 and lines[0].startswith("error:") and all(m in lines[0] for m in case.mentions)
        return ("clear error" if clear else "unclear error"), " | ".join(lines)[:300]
    if status != 0:
        return "unclear error", " | ".join(lines)[:300]
    ok = case.check is None or case.check(stdout)
    return ("correct result" if ok else "silently wrong"), stdout.strip()[:160]


def reference_check(module, workdir: Path) -> dict | None:
    """Max |logit difference| between our load() of a module's pristine checkpoint and transformers' model."""
    pristine = workdir / "pristine"
    if not (pristine / "config.json").is_file():
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    from llmdrop_rt import load

    tokens = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(0))
    ours = load(pristine, device="cpu", dtype="float32").logits(tokens)
    theirs = AutoModelForCausalLM.from_pretrained(pristine, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = theirs(tokens).logits
    return {"max_abs_logit_diff": float((ours - reference).abs().max()), "logit_scale": float(reference.abs().max())}


def main_sweep(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only cases whose name starts with this")
    parser.add_argument("--out", default=str(ROOT / "bench/results/fault-sweep.json"), help="results JSON")
    parser.add_argument("--show", type=int, default=40, help="list at most this many failing cases")
    args = parser.parse_args(argv)

    results, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="fault-sweep-") as tmp:
        os.environ["LLMDROP_RT_CACHE"] = str(Path(tmp) / "cache")  # GGUF conversions stay out of the user's cache
        for module_name, module in case_modules():
            workdir = Path(tmp) / module_name
            workdir.mkdir()
            started = time.perf_counter()
            module_cases = [c for c in module.cases(workdir) if c.name.startswith(args.only)]
            print(f"{module_name}: {len(module_cases)} cases (built in {time.perf_counter() - started:.1f} s)",
                  file=sys.stderr)
            checks[module_name] = reference_check(module, workdir)
            for case in module_cases:
                started = time.perf_counter()
                status, stdout, stderr, escaped = run_cli(case.argv)
                outcome, detail = classify(case, status, stdout, stderr, escaped)
                results.append({"module": module_name, "name": case.name, "category": case.name.split("-")[0],
                                "expect": case.expect, "outcome": outcome, "detail": detail,
                                "seconds": round(time.perf_counter() - started, 3)})

    by_category = defaultdict(Counter)
    for r in results:
        by_category[f"{r['module']}/{r['category']}"][r["outcome"]] += 1
    total = Counter(r["outcome"] for r in results)
    header = f"{'category':22s} {'cases':>5s} " + " ".join(f"{o:>15s}" for o in OUTCOMES)
    print(header)
    for category, counts in sorted(by_category.items()):
        print(f"{category:22s} {sum(counts.values()):5d} " + " ".join(f"{counts[o]:15d}" for o in OUTCOMES))
    good = total["clear error"] + total["correct result"]
    print(f"{'all':22s} {len(results):5d} " + " ".join(f"{total[o]:15d}" for o in OUTCOMES))
    share = good / max(len(results), 1)
    print(f"clear error or correct result: {good}/{len(results)} = {100 * share:.1f} %; "
          f"silently wrong: {total['silently wrong']}; tracebacks: {total['traceback']}")
    for module_name, check in checks.items():
        if check:
            print(f"reference ({module_name}): max |logit diff| vs transformers = {check['max_abs_logit_diff']:.2e} "
                  f"(logits up to {check['logit_scale']:.1f})")
    failing = [r for r in results if r["outcome"] not in ("clear error", "correct result")]
    for r in failing[: args.show]:
        print(f"  {r['outcome']:15s} {r['module']}/{r['name']}: {r['detail']}")
    write_json(args.out, {"summary": {"cases": len(results), "clear_or_correct": good, "share": share,
                                      **{o.replace(" ", "_"): total[o] for o in OUTCOMES}},
                          "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
                          "reference_checks": checks, "cases": results})
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main_sweep()
