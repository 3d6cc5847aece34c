"""Bodies for test_platform.py, run in a fresh process because the platform layer is global."""

import torch


def device_mapping() -> dict:
    # tests/_multiproc_entry.py already called setup_platform().
    from megatron_vlm import platform

    x = torch.zeros(2, device="cuda")
    y = torch.ones(3, device=torch.device("cuda", 0)).cuda()
    z = torch.empty(4, device=torch.cuda.current_device())
    w = torch.arange(3).to("cuda:1")
    v = torch.randn(2).to(torch.cuda.current_device(), non_blocking=True)
    return {
        "active": platform.cpu_mode(),
        "devices": [str(t.device) for t in (x, y, z, w, v)],
        "type_name": torch.ones(1).type(),
        "cast": torch.ones(1, dtype=torch.float64).type("torch.cuda.FloatTensor").dtype.__repr__(),
        "idempotent": platform.setup_platform(),
    }


def rng_tracker() -> dict:
    """Dropout inside the tracker's fork draws from its own stream and restores the default one."""
    from megatron.core import tensor_parallel

    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(seed=7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(5)
    restored = bool(torch.equal(before, torch.get_rng_state()))
    with tracker.fork():
        b = torch.rand(5)  # the forked stream advanced: a new draw
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        c = torch.rand(5)  # re-seeded: the first draw again
    return {"restored": restored, "a_equals_b": bool(torch.equal(a, b)),
            "a_equals_c": bool(torch.equal(a, c)),
            "default_differs": not torch.equal(a, torch.rand(5))}


def backward_allocation() -> list:
    """Allocations megatron makes inside autograd's backward (sequence parallelism) land on CPU."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            buffer = torch.empty(grad.shape, device=torch.cuda.current_device())
            buffer.copy_(grad * 2)
            return buffer

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    return x.grad.tolist()


def cross_entropy_amax() -> dict:
    """megatron's vocab-parallel cross entropy with the platform's amax row maximum against its
    own torch.max(dim) formula: loss and gradient bit for bit."""
    from megatron.core.tensor_parallel import cross_entropy as ce

    from megatron_vlm import platform
    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(seed=3)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 2, 512, generator=g) * 8
    logits[0, 0, :5] = logits[0, 0].max() + 1  # a tie for the maximum
    logits[1, 1, 7] = float("-inf")
    target = torch.randint(0, 512, (64, 2), generator=g)

    def loss_and_grad():
        x = logits.clone().requires_grad_()
        loss = ce.vocab_parallel_cross_entropy(x, target)
        loss.sum().backward()
        return loss.detach(), x.grad

    patched = ce.VocabParallelCrossEntropy.calculate_logits_max
    ours = loss_and_grad()
    ce.VocabParallelCrossEntropy.calculate_logits_max = staticmethod(
        lambda x: (x.float(), torch.max(x.float(), dim=-1)[0]))  # megatron's own formula
    theirs = loss_and_grad()
    ce.VocabParallelCrossEntropy.calculate_logits_max = patched
    return {"installed": patched is platform._logits_max_amax,
            "loss_equal": bool(torch.equal(ours[0], theirs[0])),
            "grad_equal": bool(torch.equal(ours[1], theirs[1]))}
