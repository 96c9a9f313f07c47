import pytest
import torch

from unweight import gram


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
