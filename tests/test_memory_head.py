import torch
from official_format import reference_head, reference_memory

from mirror_core.config import HeadConfig, MemoryConfig
from mirror_core.head import DualBranchHead
from mirror_core.memory import MemoryBank


def _bank(dim=48, slots=300, heads=8, top_k=32, seed=0):
    torch.manual_seed(seed)
    bank = MemoryBank(dim, MemoryConfig(num_slots=slots, num_heads=heads, top_k=top_k)).eval()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    return bank


def test_fast_memory_matches_plain_dense_math():
    bank = _bank()
    feats = torch.randn(3, 20, 48)
    plain = {k: v.detach() for k, v in bank.state_dict().items()}
    ref, ref_max, ref_ent = reference_memory(plain, feats, 8, 32)
    with torch.no_grad():
        out = bank(feats)
    torch.testing.assert_close(out.reference, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.max_score, ref_max, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent, atol=1e-5, rtol=1e-5)


def test_top_k_equal_to_slots_is_dense_softmax():
    bank = _bank(slots=64, top_k=64)
    feats = torch.randn(2, 5, 48)
    plain = {k: v.detach() for k, v in bank.state_dict().items()}
    ref, _, ent = reference_memory(plain, feats, 8, 64)
    with torch.no_grad():
        out = bank(feats)
    torch.testing.assert_close(out.reference, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ent, atol=1e-5, rtol=1e-5)


def test_keys_values_projected_once_and_refreshed_on_load():
    bank = _bank()
    calls = []
    bank.k_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for _ in range(3):
            bank(torch.randn(2, 4, 48))
        before = bank(torch.ones(1, 4, 48)).reference
    assert len(calls) == 1  # cached across batches
    state = {k: v * 1.5 for k, v in bank.state_dict().items()}
    bank.load_state_dict(state)
    with torch.no_grad():
        after = bank(torch.ones(1, 4, 48)).reference
    assert len(calls) == 2 and not torch.allclose(before, after)


def test_memory_trains_without_stale_cache():
    bank = _bank().train()
    out = bank(torch.randn(2, 4, 48))
    out.reference.sum().backward()
    assert bank.memory.grad is not None and bank.k_proj.weight.grad is not None


def test_head_matches_official_formula():
    torch.manual_seed(1)
    head = DualBranchHead(32, HeadConfig()).eval()
    tensors = {k: v.detach() for k, v in head.state_dict().items()}
    args = (torch.rand(4), torch.rand(4) * 3, torch.randn(4, 32), torch.randn(4, 32))
    with torch.no_grad():
        torch.testing.assert_close(head(*args), reference_head(tensors, *args), atol=1e-6, rtol=1e-6)
    assert set(tensors) == {
        "perplexity_mlp.0.weight", "perplexity_mlp.0.bias", "residual_mlp.0.weight", "residual_mlp.0.bias",
        "residual_mlp.3.weight", "residual_mlp.3.bias", "head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias",
    }


def test_cpu_readout_equals_dense_for_any_chunking():
    from mirror_core.readout import readout_cpu, readout_dense

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, n, 12, generator=gen) for n in (53, 200, 200))
    dense = readout_dense(q, k, v, 16)
    for chunk_bytes in (1, 4 * 200 * 4 * 7, 1 << 30):  # one row, 7 rows (53 = 7*7+4), everything
        got = readout_cpu(q, k, v, 16, chunk_bytes=chunk_bytes)
        for a, b in zip(got, dense):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inference_readout_path_matches_training_path():
    bank = _bank()
    feats = torch.randn(2, 9, 48)
    with torch.no_grad():
        fast = bank(feats)  # chunked CPU read-out
    slow = bank(feats.requires_grad_())  # autograd: the plain dense form
    torch.testing.assert_close(fast.reference, slow.reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.entropy, slow.entropy.detach(), atol=1e-6, rtol=1e-5)
