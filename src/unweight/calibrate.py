"""The one layer-by-layer calibration driver: decoder blocks in order, statistics from forward hooks.

The shape of the GPTQ (Frantar et al., 2022, arXiv 2210.17323) and Wanda (Sun et al., 2023,
arXiv 2306.11695) drivers, once, for every decoder architecture transformers loads:

1. :func:`capture_block_inputs` runs the calibration windows through the model with every decoder
   block swapped for a catcher that records its call (the hidden states entering block 0 and, for
   every block, its keyword arguments: attention mask, position embeddings, ...) and passes the
   hidden states on unchanged, so no block computes. Keyword arguments are recorded per block
   because they differ between blocks in some families (Gemma 3 alternates sliding-window and global
   layers, each with its own mask and rotary embeddings).
2. :func:`run_layerwise` then walks the blocks: the calibration inputs go through block i with forward
   hooks on its ``nn.Linear`` modules feeding a :class:`LinearStats` accumulator per distinct input
   (q/k/v share one, as do gate/up), ``process(block_index, name, linear, stats)`` compresses the
   weights in place, and the block runs again so that the *compressed* block's outputs become block
   i+1's inputs. One block's statistics are in memory at a time; with ``device`` set, one block at a
   time is moved there and back.

   With ``true_sequential`` (GPTQ's ``--true-sequential``), each Linear is compressed in its forward
   pre-hook, as soon as its inputs are complete, so the Linears after it in the block are calibrated on
   inputs that come through the already-compressed ones, and that same forward's outputs go to block
   i+1: one forward per block instead of two. Its inputs are complete only once every window has
   reached it, so the batches' forwards run in lockstep (:class:`Lockstep`: a thread each, one
   running at a time): each waits in every Linear's pre-hook until all batches have reached that
   Linear, which is then compressed once. (Running the windows as one batch instead costs the same
   products, but its element-wise passes run out of cache: GPTQ on gemma3-270m in bf16 took 85 s
   that way against 71 s in lockstep, one thread.)

While it runs, a model that attends by SDPA attends through ``unweight.cpu_attention`` instead: on a
CPU with AVX512-BF16 a bf16 block's causal attention visits only the keys each query sees, where
torch's flash attention computes the whole square (2.75x on smollm2-135m's calibration batches, 2.98x on
gemma3-270m's, ``bench/attention_speed.py``); anything else still goes to SDPA.

The decoder blocks are found, not named per family: the ``nn.ModuleList`` whose length is the (text)
config's ``num_hidden_layers``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from unweight.cpu_attention import calibration_attention
from unweight.errors import UnweightError
from unweight.gram import add_gram_upper

STATS = ("hessian", "sq_norm", "abs_mean")  # what a LinearStats can accumulate
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8  # calibration windows per block forward
DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")  # no KV cache here


# ----------------------------------------------------------------------------- calibration data

def calibration_windows(tokenizer, n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                        seed: int = 0, corpus_name: str = "austen") -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids: windows at random offsets (fixed ``seed``) in the
    calibration split, which shares no document with the evaluation split (DESIGN.md).

    The split is joined with "\\n\\n" and tokenized once, as evaluation text is; windows are drawn
    without overlap from the aligned slots, so no token is seen twice; a tokenizer that adds a BOS
    token gets it at the start of every window, as in evaluation.
    """
    from unweight.data import corpus
    from unweight.eval.perplexity import cut_window, leading_bos, text_tokens, window_slots

    bos = leading_bos(tokenizer)
    ids = text_tokens(tokenizer, corpus(corpus_name, "calib"))
    if n_samples < 1 or seq_len < 2:
        raise UnweightError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    slots = window_slots(len(ids), seq_len, bos)
    if n_samples > slots:
        raise UnweightError(f"the {corpus_name!r} calibration split has {len(ids)} tokens: at most "
                            f"{slots} windows of {seq_len}, asked for {n_samples}")
    chosen = sorted(random.Random(seed).sample(range(slots), n_samples))
    return torch.tensor([cut_window(ids, s, seq_len, bos) for s in chosen], dtype=torch.long)


# ----------------------------------------------------------------------------- statistics

@dataclass
class LinearStats:
    """Statistics of the inputs x (rows of X, ``[tokens, in_features]``) seen by one or more Linears.

    - ``hessian``: the mean of x x^T, ``X^T X / n`` (``[in, in]``), the GPTQ/SparseGPT proxy Hessian of
      the layer-wise squared error (up to the factor 2 that no method needs);
    - ``sq_norm``: the sum over tokens of x_j^2 per input column, ``||X_j||^2`` (Wanda's score is
      ``|W_ij| * ||X_j||``; importance weights for weighted K-means);
    - ``abs_mean``: the mean of |x_j| per input column (AWQ's activation scale).

    Column sums are taken in float32 over strips of a batch's rows and accumulated in float64; the
    Hessian is kept in float32 (GPTQ's choice; it is a mean of well-scaled terms), only its upper
    triangle computed, and made whole once for the Linears that share it (q/k/v, gate/up): callers
    must not change it in place. All on the device the inputs arrive on.
    """

    in_features: int
    want: frozenset[str]
    n_tokens: int = 0
    _xtx: torch.Tensor | None = None
    _whole: torch.Tensor | None = None  # the symmetric mean, once asked for (dropped by add_batch)
    _sq: torch.Tensor | None = None
    _abs: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate the inputs ``x`` (``[..., in_features]``)."""
        x = x.detach().reshape(-1, self.in_features)
        self._whole = None
        if "hessian" in self.want:
            if self._xtx is None:
                self._xtx = torch.zeros(self.in_features, self.in_features, device=x.device)
            add_gram_upper(self._xtx, x)  # bf16 inputs are summed in float32 without a float32 copy
        if self._sq is None and "sq_norm" in self.want:
            self._sq = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
        if self._abs is None and "abs_mean" in self.want:
            self._abs = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
        if self._sq is not None or self._abs is not None:
            # sums in float32 over strips of rows whose float32 copy stays in cache (a batch of 8 x 512
            # tokens of 2,048 columns: 13x faster than one pass over it), accumulated in float64
            for part in x.split(_STRIP_ROWS):
                pf = part.to(torch.float32)
                if self._sq is not None:
                    self._sq.add_(pf.square().sum(0))
                if self._abs is not None:
                    self._abs.add_(pf.abs().sum(0))
        self.n_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self._xtx is None:
            raise UnweightError("this method needs the Hessian X^T X: collect stats with 'hessian'")
        if self._whole is None:
            self._whole = torch.triu(self._xtx).add_(torch.triu(self._xtx, 1).mT).div_(max(self.n_tokens, 1))
        return self._whole

    @property
    def sq_norm(self) -> torch.Tensor:
        if "sq_norm" not in self.want:
            raise UnweightError("this method needs the column norms ||X_j||^2: collect stats with 'sq_norm'")
        if self._sq is None:
            raise UnweightError("no calibration inputs reached this layer")
        return self._sq.to(torch.float32)

    @property
    def abs_mean(self) -> torch.Tensor:
        if self._abs is None:
            raise UnweightError("this method needs the mean |x|: collect stats with 'abs_mean'")
        return (self._abs / max(self.n_tokens, 1)).to(torch.float32)


_STRIP_ROWS = 512  # rows per pass of the column sums in LinearStats.add_batch
Process = Callable[[int, str, nn.Linear, LinearStats], None]
AfterBlock = Callable[[int, nn.Module, list[torch.Tensor]], None]


# ----------------------------------------------------------------------------- finding blocks

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the (outermost) ``nn.ModuleList`` of length ``num_hidden_layers``."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnweightError(f"{type(model).__name__}: not a transformers model (no config)")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    if not n:
        raise UnweightError(f"{type(model).__name__}: config has no num_hidden_layers")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UnweightError(f"{type(model).__name__}: no nn.ModuleList of {n} decoder blocks found")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of a block, by their name inside it (``self_attn.q_proj``, ...)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- capturing inputs

class _StopForward(Exception):
    """Raised from a hook to end a forward pass whose remaining outputs are not needed."""


class BlockStandIn(nn.Module):
    """Takes a decoder block's place in the model's layer list; attributes the model reads off its
    blocks (``attention_type``...) come from the block it stands in for. Subclasses define forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)


class _Catcher(BlockStandIn):
    """Stands in for a decoder block during capture: records the call, computes nothing."""

    def __init__(self, block: nn.Module, index: int, record: Callable, last: bool):
        super().__init__(block)
        self.index, self.record, self.last = index, record, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.record(self.index, hidden, {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS})
        if self.last:
            raise _StopForward
        return hidden


@dataclass
class BlockInputs:
    """What the blocks are called with: per batch, the hidden states entering the next block to run,
    and per batch and block, the keyword arguments the model passes to that block."""

    hidden: list[torch.Tensor]  # per batch, [batch, seq_len, hidden]
    kwargs: list[list[dict]]  # [batch][block] -> kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor,
                         batch_size: int = DEFAULT_BATCH, compute_dtype: torch.dtype | None = None) -> BlockInputs:
    """Block 0's input hidden states and every block's call kwargs, for ``windows`` in batches.

    ``compute_dtype``: the token embeddings are cast to it as they leave the embedding, so everything
    computed from them before block 0 (embedding scale, rotary tables) is computed in it. For a model
    held in bfloat16 with bfloat16 weights, float32 here gives exactly the inputs of the float32 model."""
    layers = decoder_layers(model)
    originals = list(layers)
    embedding = model.get_input_embeddings()
    embed_device = embedding.weight.device
    out = BlockInputs(hidden=[], kwargs=[])
    batch_kwargs: list[dict] = []

    def record(index, hidden, kwargs):
        if index == 0:
            out.hidden.append(hidden)
        batch_kwargs.append(kwargs)

    cast = None if compute_dtype is None else embedding.register_forward_hook(
        lambda _module, _args, output: output.to(compute_dtype))
    try:
        for i, block in enumerate(originals):
            layers[i] = _Catcher(block, i, record, last=i == len(originals) - 1)
        for batch in windows.split(batch_size):
            batch_kwargs = []
            try:
                model(input_ids=batch.to(embed_device), use_cache=False)
            except _StopForward:
                pass
            if len(batch_kwargs) != len(originals):
                raise UnweightError(f"{type(model).__name__}: the forward pass called "
                                    f"{len(batch_kwargs)} of {len(originals)} decoder blocks")
            out.kwargs.append(batch_kwargs)
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
        if cast is not None:
            cast.remove()
    return out


def _to(obj, device, dtype: torch.dtype | None = None):
    """``obj`` (tensors inside tuples, lists and dicts) on ``device``; floating tensors cast to
    ``dtype`` if given."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _hidden(output) -> torch.Tensor:
    """A block's output hidden states (blocks return a tensor, or a tuple led by it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


# ----------------------------------------------------------------------------- the driver

@torch.no_grad()
def run_layerwise(model: nn.Module, windows: torch.Tensor, process: Process | None,
                  stats: Iterable[str] = ("hessian",), batch_size: int | None = None,
                  device: torch.device | str | None = None,
                  targets: Callable[[str, nn.Linear], bool] | None = None,
                  after_block: AfterBlock | None = None, progress: bool = True,
                  compute_dtype: torch.dtype | None = None, true_sequential: bool = False) -> None:
    """Walk the decoder blocks with the calibration ``windows`` (``[n, seq_len]`` token ids).

    For each block: collect ``stats`` (names in :data:`STATS`) of the inputs of its Linears (those
    that ``targets(name, linear)`` accepts), call ``process(block_index, name, linear, stats)`` for
    each in the order the block calls them, then recompute the block's outputs with the processed
    weights and feed them to the next block. ``after_block(block_index, block, outputs)`` sees those
    outputs. ``process=None`` only propagates (no hooks, one pass per block). ``batch_size``: windows
    per forward (default: :func:`calibration_batch`). ``device``: where each
    block runs (default: where its weights are); it is moved back afterwards. ``compute_dtype``: each
    block is cast to it while it runs and each tensor back to its own dtype afterwards, and the hidden
    states are kept in it, so a model can be held in bfloat16 (half the memory) and calibrated in
    float32; ``process`` must leave weights representable in the held dtype for the cast back to be
    exact. ``true_sequential``: compress each Linear as the block's one forward reaches it (see the
    module docstring).
    """
    want = frozenset(stats)
    if unknown := want - set(STATS):
        raise UnweightError(f"unknown statistics {sorted(unknown)}; valid: {', '.join(STATS)}")
    with calibration_attention(model):
        layers = decoder_layers(model)
        one_pass = true_sequential and process is not None
        runs_on = torch.device(device) if device is not None else next(layers.parameters()).device
        inputs = capture_block_inputs(model, windows, calibration_batch(batch_size, len(windows), runs_on),
                                      compute_dtype)
        hidden = inputs.hidden
        for index, block in enumerate(tqdm(layers, desc="blocks", unit="block", disable=not progress)):
            home = next(block.parameters()).device
            held = _dtypes(block) if compute_dtype is not None else None
            run_on = torch.device(device) if device is not None else home
            block.to(run_on, compute_dtype)
            kwargs = [_to(inputs.kwargs[b][index], run_on, compute_dtype) for b in range(len(hidden))]
            hidden = [h.to(run_on, compute_dtype) for h in hidden]
            if one_pass:  # one forward: compresses, and its outputs go on
                hidden = _collect(block, hidden, kwargs, want, targets,
                                  now=lambda name, linear, st, index=index: process(index, name, linear, st))[1]
            else:
                if process is not None:
                    per_linear, _ = _collect(block, hidden, kwargs, want, targets)
                    for name, (linear, st) in per_linear.items():
                        process(index, name, linear, st)
                    del per_linear
                if after_block is not None or index < len(layers) - 1:  # the last block's outputs go nowhere
                    hidden = [_hidden(block(h, **kw)) for h, kw in zip(hidden, kwargs)]
            if after_block is not None:
                after_block(index, block, hidden)
            block.to(home)
            if held is not None:
                _restore_dtypes(block, held)


def calibration_batch(batch_size: int | None, n_windows: int, device: torch.device) -> int:
    """Windows per block forward: ``batch_size`` if set; else :data:`DEFAULT_BATCH` on the CPU (a
    batch's activations stay in cache) and every window at once on a GPU, where true-sequential then
    runs one forward per block instead of lockstep threads (which serialise kernel launches: on an
    H200, with batches of 8, Wanda took 8.8 s true-sequential against 0.78 s block by block)."""
    if batch_size is not None:
        return batch_size
    return DEFAULT_BATCH if device.type == "cpu" else max(n_windows, 1)


def _dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """Each parameter's and buffer's dtype (a block may mix them: norms kept in float32)."""
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _restore_dtypes(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.dtype != dtypes[n]:
            t.data = t.data.to(dtypes[n])


class _Aborted(Exception):
    """Ends a lockstep call whose sibling failed."""


class Lockstep:
    """Runs one call per batch, each in a thread, one at a time and in turns (round robin): a call runs
    until it calls :meth:`meet` or returns, then the next one runs. When the last call reaches
    ``meet(label, when_all)``, every call has reached that same ``label`` (checked), and ``when_all()``
    runs before the first one goes on. Only one thread runs at any time, so the result is that of
    running the calls one after another with a pause at each meeting.

    An error in any call ends the others at their next turn and is raised by :meth:`run`.
    """

    _END = object()  # the label of a call that has returned

    def __init__(self) -> None:
        self._local = threading.local()
        self._cond = threading.Condition()
        self._n, self._turn, self._labels, self._error = 0, 0, [], None

    @property
    def index(self) -> int:
        """Which call the current thread runs."""
        return self._local.index

    def meet(self, label, when_all: Callable[[], None]) -> None:
        """Wait here until every call has reached ``label``; the last to arrive runs ``when_all()``."""
        b = self.index
        self._labels[b] = label
        if b == self._n - 1:
            self._check(label)
            when_all()
        self._hand_on(b)
        self._wait(b)

    def run(self, calls: Sequence[Callable[[], object]]) -> list:
        """The calls' results, in order (each run with gradients off, as the driver runs)."""
        self._n, self._turn, self._labels, self._error = len(calls), 0, [None] * len(calls), None
        results: list = [None] * len(calls)

        def worker(b: int) -> None:
            self._local.index = b
            try:
                self._wait(b)
                with torch.no_grad():
                    results[b] = calls[b]()
                self._labels[b] = self._END
                if b == self._n - 1:
                    self._check(self._END)
                self._hand_on(b)
            except _Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it
                with self._cond:
                    self._error = self._error or e
                    self._cond.notify_all()

        if len(calls) == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(b,), daemon=True) for b in range(len(calls))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if self._error is not None:
            raise self._error
        return results

    def _check(self, label) -> None:
        if any(other != label for other in self._labels):
            names = ["(returned)" if x is self._END else x for x in self._labels]
            raise UnweightError(f"the batches took different paths through the block: {names}")

    def _hand_on(self, b: int) -> None:
        with self._cond:
            self._turn = (b + 1) % self._n
            self._cond.notify_all()

    def _wait(self, b: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == b or self._error is not None)
            if self._error is not None:
                raise _Aborted


def _collect(block: nn.Module, hidden: Sequence[torch.Tensor], kwargs: Sequence[dict],
             want: frozenset[str], targets, now: Callable[[str, nn.Linear, LinearStats], None] | None = None,
             ) -> tuple[dict[str, tuple[nn.Linear, LinearStats]], list[torch.Tensor]]:
    """Run ``block`` on every batch with hooks on its Linears' inputs; one accumulator per distinct input.

    Linears that receive the very same input tensor (q/k/v after the input norm, gate/up after the
    post-attention norm) share one :class:`LinearStats`, so X^T X is computed once for them. A batch's
    forward stops as soon as every Linear has seen its input (the last one, e.g. the MLP's
    down-projection, is then never computed: its output is not a statistic).

    ``now(name, linear, stats)``, if given, is called once per Linear, in its pre-hook, once every batch
    has added its input (true-sequential: it may change the weights the Linear is about to apply); the
    batches' forwards then run in :class:`Lockstep` to the end, and their output hidden states are
    returned with the accumulators (else ``[]``).
    """
    linears = {n: m for n, m in block_linears(block).items() if targets is None or targets(n, m)}
    found: dict[str, tuple[nn.Linear, LinearStats]] = {}
    last: dict[int, tuple] = {}  # per batch: the previous hook's input tensor and its accumulator
    counted: set[tuple[int, int]] = set()  # (accumulator id, batch): shared accumulators count once
    seen: set[str] = set()  # Linears that have seen the current batch (without `now`)
    lockstep = Lockstep() if now is not None else None
    current = [0]  # the batch running (without `now`; with it, the lockstep thread's)

    def hook(name):
        def fn(module, args):
            x = args[0]
            b = lockstep.index if lockstep is not None else current[0]
            if name not in found:
                prev = last.get(b)
                found[name] = (module, prev[1] if prev is not None and prev[0] is x  # same input as the
                               else LinearStats(module.in_features, want))  # Linear called just before
            acc = found[name][1]
            if (id(acc), b) not in counted:
                acc.add_batch(x)
                counted.add((id(acc), b))
            last[b] = (x, acc)
            if lockstep is not None:
                lockstep.meet(name, lambda: now(name, module, acc))
                return
            seen.add(name)
            if len(seen) == len(linears):  # the rest of the block's forward is not needed
                raise _StopForward
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        if lockstep is not None:
            return found, lockstep.run([lambda h=h, kw=kw: _hidden(block(h, **kw)) for h, kw in zip(hidden, kwargs)])
        for b, (h, kw) in enumerate(zip(hidden, kwargs)):
            current[0] = b
            seen.clear()
            last.clear()  # a finished batch's inputs are not held on to
            try:
                block(h, **kw)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return found, []
