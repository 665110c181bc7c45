import dataclasses, sys, torch
sys.path[:0] = ["tests", "tests/gpu"]
from oracle import CASES_BY_NAME, make_inputs, on_cuda, ring_results_for_rank, reference_results, errors_against, unshard_results
from fa4_baseline import upstream_results
from fa4_cp import SimulatedRing
def poison(on):
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = on
runs = [("softcap_sinks_balanced_gqa", 72, 72, False), ("softcap_sinks_balanced_gqa", 72, 72, True), ("softcap_sinks_balanced_gqa", 72, 7, True),
        ("softcap_sinks_balanced_gqa", 8, 8, True), ("balanced_causal", 72, 72, True), ("sinks_balanced_window", 72, 72, True), ("sinks_balanced_window", 72, 72, False)]
for name, world, seed, poisoned in runs:
    poison(poisoned)
    case = dataclasses.replace(CASES_BY_NAME[name], head_dim=64)
    inputs = make_inputs(case, world, torch.bfloat16, seed=seed)
    gi = on_cuda(inputs)
    per_rank = SimulatedRing(world).run(lambda g: ring_results_for_rank(case, world, gi, g, g.rank, backend="fa4"))
    print(f"== {name} W={world} seed={seed} poisoned={poisoned}", flush=True)
    for r, res in enumerate(per_rank):
        bad = {k: int(v.isnan().sum()) for k, v in res.items() if v.isnan().any()}
        if bad:
            rows = res["out"].isnan().nonzero()[:12].tolist()
            print(f"  rank {r} NaN counts {bad}; out NaN (row, head, dim) {rows}", flush=True)
            lse = res["lse"]
            print("   lse at those rows", [float(lse[h, t]) if lse.dim() == 2 else None for t, h, *_ in rows[:6]] if res["out"].dim() == 3 else None, flush=True)
    truth = reference_results(case, world, inputs, torch.float64)
    ring = errors_against(truth, unshard_results(case, world, per_rank))
    base = errors_against(truth, upstream_results(case, world, inputs, torch.bfloat16))
    print("  ring", {k: f"{v:.3e}" for k, v in ring.items()}, "\n  upstream", {k: f"{v:.3e}" for k, v in base.items()}, flush=True)
    if case.sinks:
        print("  ds truth", truth["ds"].tolist(), "ring", unshard_results(case, world, per_rank)["ds"].tolist(), flush=True)
