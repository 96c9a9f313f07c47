import pytest
import torch

from unweight import dpbf16, gram


@pytest.fixture
def threads(request):
    """torch's thread count for the test (``add_gram_upper`` takes BLAS's path at one thread only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("add", [gram.add_gram_upper, gram.add_gram_upper_reference])
@pytest.mark.parametrize("n, d", [(0, 5), (1, 1), (37, 129), (300, 700), (65, 1030)])
def test_the_upper_triangle_is_accumulated_and_the_lower_ignored(add, n, d, threads):
    g = torch.Generator().manual_seed(n + d)
    x1, x2 = torch.randn(n, d, generator=g), torch.randn(n + 3, d, generator=g)
    acc = torch.full((d, d), 7.0)  # a lower triangle that must be ignored, an upper one to add to
    add(acc, x1)
    add(acc, x2.T.contiguous().T)  # a non-contiguous input
    full = 7.0 + x1.double().T @ x1.double() + x2.double().T @ x2.double()
    torch.testing.assert_close(torch.triu(acc).double(), torch.triu(full), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_bundled_blas_is_used_at_one_thread_and_agrees_with_torch(threads):
    if gram._openblas() is None:
        pytest.skip("this numpy bundles no OpenBLAS")
    x = torch.randn(513, 257, generator=torch.Generator().manual_seed(1))
    a, b = torch.zeros(257, 257), torch.zeros(257, 257)
    gram.add_gram_upper(a, x)
    gram.add_gram_upper_reference(b, x)
    torch.testing.assert_close(torch.triu(a), torch.triu(b), rtol=1e-5, atol=1e-4)
    # ssyrk leaves the lower triangle alone; the strips write into it in their diagonal blocks
    assert torch.equal(torch.tril(a, -1), torch.zeros(257, 257)) == (threads == 1)


needs_bf16_units = pytest.mark.skipif(not dpbf16.available(), reason="this CPU has no AVX512-BF16")


@needs_bf16_units
@pytest.mark.parametrize("n, d", [(1, 64), (37, 128), (300, 576), (513, 640), (8, 1536)])
def test_bf16_inputs_are_summed_exactly_enough_by_the_bf16_kernel(n, d):
    """The products of bf16 values are exact in float32; only the float32 sums round. Heights 6 (576,
    1,536) and 4 (64, 128, 640), an odd token count, a non-contiguous input, an accumulator added to."""
    g = torch.Generator().manual_seed(n + d)
    x1 = (torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 4).bfloat16()
    x2 = torch.randn(d, n + 3, generator=g).bfloat16().T  # non-contiguous
    acc = torch.full((d, d), 7.0)
    dpbf16.add_gram_upper_bf16(acc, x1)
    dpbf16.add_gram_upper_bf16(acc, x2)
    full = 7.0 + x1.double().T @ x1.double() + x2.double().T @ x2.double()
    torch.testing.assert_close(torch.triu(acc).double(), torch.triu(full), rtol=2e-6, atol=2e-5 * (n + 3))


@needs_bf16_units
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("d, kernel", [(128, True), (96, False), (448, True), (1000, False)])
def test_bf16_inputs_take_the_bf16_kernel_at_one_thread_when_a_tile_fits(d, kernel, threads, monkeypatch):
    calls = []
    monkeypatch.setattr(dpbf16, "add_gram_upper_bf16",
                        lambda acc, x, f=dpbf16.add_gram_upper_bf16: calls.append(x.shape) or f(acc, x))
    x = torch.randn(70, d, generator=torch.Generator().manual_seed(d)).bfloat16()
    acc, ref = torch.zeros(d, d), torch.zeros(d, d)
    gram.add_gram_upper(acc, x)
    gram.add_gram_upper_reference(ref, x.float())
    torch.testing.assert_close(torch.triu(acc), torch.triu(ref), rtol=1e-5, atol=1e-4)
    assert bool(calls) == (kernel and threads == 1)


def test_tile_heights():
    assert [dpbf16.rows_for(d) for d in (0, 63, 64, 96, 128, 576, 640, 1536, 2048, 448)] == \
        [None, None, 4, None, 4, 6, 4, 6, 4, 4]
