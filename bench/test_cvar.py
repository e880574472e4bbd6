"""Forward + backward of the CVaR cross-entropy (C = 8 classes, alpha = 0.3): every fastsam impl against the
torch.topk composite and the affect paper authors' Brent search of lambda (fastsam.bench.cvar_peers), per batch
size n. Grouped by n; each case is ``loss = f(logits, target, alpha); loss.backward()`` on a leaf."""
from fastsam.bench import cvar_peers
from fastsam.bench.timing import sync


def test_cvar_cross_entropy(benchmark, cvar_case, sam_device, sam_dtype):
    n, row = cvar_case
    logits, target = cvar_peers.make_logits(n, device=sam_device, dtype=sam_dtype())
    value, evals = cvar_peers.evaluate(row, logits, target)
    calls = cvar_peers.step_fn(row, logits, target)

    def step():
        calls()
        sync(sam_device)

    step()
    benchmark.group = f"cvar_cross_entropy n={n}"
    benchmark.extra_info.update(n=n, classes=cvar_peers.CLASSES, alpha=cvar_peers.ALPHA, impl=row, loss=value,
                                evals=evals)
    benchmark(step)
