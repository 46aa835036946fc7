"""Secure aggregation (SecAgg+, Flower 1.41) of one-round sufficient statistics: the server learns only the sum.

Federated PaDiM needs one thing from the clients: the SUM of their statistics (image count, sum of
features (P, k), sum of outer products (P, k, k)). Here the server obtains that sum through Flower's
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (client), used as their authors intend: inside
the legacy ``DefaultWorkflow`` with a ``LegacyContext`` and a Strategy, the ClientApp a ``NumPyClient``
whose ``fit`` returns the arrays.

Encoding: option (a), per-client arrays scaled by a PUBLIC constant into SecAgg+'s clipping range.
flwr's workflow securely computes the weighted mean of ``[w, w * params]``; it quantizes each client's
``w / max_weight * params`` (clipped to +-``clipping_range`` = 8) to integers in [0, Q] with stochastic
rounding, sums them modulo 2^32 under masks, and dequantizes. We use it as a secure SUM:

* every client has the same weight (``num_examples = 1``, ``max_weight = 1``), so its weight is
  quantized exactly (``q_ratio = Q``) and reveals nothing: an image count as weight would be sent in
  the clear (``FitRes.num_examples``), so the count travels inside the masked vector instead;
* array j of the statistics has a public bound ``b_j`` on any one client's absolute entry
  (:class:`ArraySpec`; for PaDiM from the feature-norm bound B the server announces and the most images a
  client may hold: ``|sum| <= N B``, ``|outer| <= N B^2``); the client sends ``x = s * 8 / b_j``. The
  scale is the same for every client and never derived from one client's data;
* an entry beyond its bound is clipped and counted (``on_overflow="clip"``) or refused
  (``"raise"``: the client drops out); the count of clipped entries is itself summed securely as an extra
  integer array, so the server learns only the total. Nothing is silently wrapped: the bounds keep
  every entry inside flwr's clipping range, and Q is chosen so that ``n * Q < 2^32`` (the modulus), so the
  sum of n quantized vectors never wraps either;
* the server recovers the exact integer sum S of the quantized values from the workflow's mean
  (``S = (mean + 8) * n * Q / 16``, rounded: float error << 1 quantum since S < 2^32), then
  ``sum_j = (2 S / Q - n) * b_j``. Error: stochastic rounding moves each client's entry by less than one
  quantum ``2 b_j / Q`` (unbiased), so ``|secure sum - exact sum| < n * 2 * b_j / Q`` per entry
  (:meth:`SecureSumSettings.error_bound`). With Q a power of two and integer arrays given power-of-two
  bounds, integer arrays (the count, the clip count) are summed exactly.

Why not (b), flwr's primitives with our own messages: the workflow already implements key agreement,
Shamir sharing, dropout recovery and unmasking; re-wiring them would be a second, unreviewed copy of
the protocol, and the only thing (a) costs is the quantization error above, which a public bound makes
predictable.

What SecAgg+ protects against: an honest-but-curious server (it follows the protocol but looks at
everything it receives) learns only the sum of the clients that survived to the masked-vector stage,
and only if they are at least ``reconstruction_threshold`` (t); each masked vector is uniform modulo
2^32 to it. Dropouts: a client that fails after sharing its keys is unmasked from its neighbours'
shares; the round completes as long as every client keeps at least t live neighbours (with the default
complete graph, at most ``num_shares - t`` dropouts in all); the sum is then over the clients whose masked
vectors arrived, and this module refuses it unless at least ``min_clients`` (default: all) contributed
(:class:`SecureSumError` naming the dropped clients and why). A client that fails while computing its
statistics (a non-finite value, a wrong shape, an entry beyond its bound under "raise") drops out at the
masked-vector stage, which SecAgg+ recovers from; one that fails in the unmask stage has already
contributed. But flwr 1.41 does not recover from a client lost in the first two stages (setup, key
sharing): the survivors then fail in the unmask stage looking for that client's key shares (KeyError), and
the round halts with no sum (checked in simulation). Collusion: the server
together with fewer than t clients learns nothing beyond the sum of the other clients' inputs (with
SecAgg+'s sparse graph, ``num_shares < n``, the guarantee is probabilistic over the random graph).

What it does not protect against: a malicious server. flwr 1.41 has no consistency round (Bonawitz
et al.'s signed list of survivors), so a server that tells different clients different survivor lists
can gather both the self-mask and the pairwise-mask shares of one live client if enough shares reach it
(our default majority threshold ``t > num_shares / 2`` makes that impossible without colluding clients,
not in general). Masks are expanded by flwr's ``pseudo_rand_gen``: numpy's Mersenne Twister seeded with
32 bits folded from each 32-byte key, not a cryptographic PRG, so the masks are weaker than the
protocol's proofs assume. The sum itself: it is revealed exactly as intended, and a sum over few
clients, or a difference of two sums over client sets that differ by one, tells a lot about a single
client; that is what differential privacy (noise added to the sum) is for. Nothing protects the
result after the server has it, nor a client's inputs from a client that lies (a malicious client can
send any in-range vector and bias the sum; only the bounds limit it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinspect.errors import FedinspectError

MODULUS = 2**32  # flwr's largest modulus_range
CLIPPING_RANGE = 8.0  # flwr's default; a power of two keeps the encoding of integers exact
CONFIG_KEY = "fedinspect.secure-sum"
OVERFLOW_POLICIES = ("clip", "raise")
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION

Compute = Callable[[int, dict[str, Any]], list[np.ndarray]]


class SecureSumError(FedinspectError, ValueError):
    """Bad statistics (shape, non-finite, out of range under "raise"), or a secure sum that could not be formed."""


# ---------------------------------------------------------------- what is summed
@dataclass(frozen=True)
class ArraySpec:
    """One array of the statistics: its shape and the public bound on any one client's absolute entry.

    ``integer`` arrays (counts) must hold integers; their bound is rounded up to a power of two so that
    their sum comes back exactly.
    """

    shape: tuple[int, ...]
    bound: float
    integer: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise SecureSumError(f"array {self.name or '?'}: negative dimension in shape {self.shape}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SecureSumError(f"array {self.name or '?'}: the bound must be finite and > 0, got {self.bound}")
        if self.integer:
            object.__setattr__(self, "bound", float(2 ** math.ceil(math.log2(self.bound))))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class SecureSumSettings:
    """Public parameters of a secure sum, announced by the server to every client.

    ``num_shares`` (default: every client, the complete graph of the original SecAgg) and
    ``reconstruction_threshold`` (default: a majority of the shares) are SecAgg+'s; ``min_clients``
    (default: all) is how many contributions the caller accepts in the sum; ``quantization_bits``
    (default: the most with ``n * 2^bits < 2^32``) sets Q; ``timeout`` (s, None: wait for every reply)
    bounds each of the four exchanges. ``seed`` seeds the stochastic rounding (numpy's global generator,
    which flwr's quantizer uses) per client; ``client_config`` is public configuration passed to the
    clients' ``compute``.
    """

    specs: tuple[ArraySpec, ...]
    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    min_clients: int | None = None
    on_overflow: str = "clip"
    quantization_bits: int | None = None
    timeout: float | None = None
    seed: int = 0
    client_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        if not self.specs or not all(isinstance(s, ArraySpec) for s in self.specs):
            raise SecureSumError("specs must be a non-empty sequence of ArraySpec")
        if self.on_overflow not in OVERFLOW_POLICIES:
            raise SecureSumError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {self.on_overflow!r}")

    def protocol(self, n_clients: int) -> dict[str, int]:
        """SecAgg+'s parameters for ``n_clients``: shares, threshold, min_clients, quantization range Q."""
        n = int(n_clients)
        if n < 3:
            raise SecureSumError(f"secure aggregation needs at least 3 clients, got {n}: with two, each learns the "
                                 "other's statistics from the sum (and flwr's SecAgg+ needs num_shares > 2)")
        shares = n if self.num_shares is None else int(self.num_shares)
        if not 3 <= shares <= n:
            raise SecureSumError(f"num_shares must be in [3, {n}] (the number of clients), got {shares}")
        if shares < n and shares % 2 == 0:
            raise SecureSumError(f"num_shares below the number of clients must be odd (SecAgg+'s neighbourhoods are "
                                 f"symmetric; flwr 1.41 mis-sizes the shares of an even count), got {shares}")
        threshold = shares // 2 + 1 if self.reconstruction_threshold is None else int(self.reconstruction_threshold)
        if not 2 <= threshold < shares:
            raise SecureSumError(f"reconstruction_threshold must be in [2, num_shares - 1 = {shares - 1}], "
                                 f"got {threshold}")
        min_clients = n if self.min_clients is None else int(self.min_clients)
        if not threshold <= min_clients <= n:
            raise SecureSumError(f"min_clients must be in [reconstruction_threshold = {threshold}, {n}], "
                                 f"got {min_clients}")
        largest = math.floor(math.log2((MODULUS - 1) / n))
        bits = largest if self.quantization_bits is None else int(self.quantization_bits)
        if not 8 <= bits <= largest:
            raise SecureSumError(f"quantization_bits must be in [8, {largest}] for {n} clients (n * 2^bits < 2^32, "
                                 f"else the sum wraps modulo 2^32), got {bits}")
        q = 2**bits
        for spec in self._all_specs():
            if spec.integer and spec.bound > q // 2:
                raise SecureSumError(f"integer array {spec.name or spec.shape}: bound {spec.bound:g} above Q/2 = "
                                     f"{q // 2}: its sum would not be exact")
        return {"num_shares": shares, "reconstruction_threshold": threshold, "min_clients": min_clients,
                "quantization_range": q}

    def _all_specs(self) -> tuple[ArraySpec, ...]:
        """The statistics plus the clip count the secure client appends."""
        return (*self.specs, clip_count_spec(self.specs))

    def error_bound(self, n_clients: int, contributors: int | None = None) -> list[float]:
        """Per array, the bound on |secure sum - exact sum| of any entry: one quantum 2 b / Q per contributor (all
        ``n_clients``, or fewer after dropouts), 0 for integer arrays.

        Stochastic rounding moves each client's entry by less than one quantum; the decoding adds float
        rounding of order 1e-16 relative to ``n * b``, covered by the 1e-9 margin.
        """
        q = self.protocol(n_clients)["quantization_range"]
        n = n_clients if contributors is None else contributors
        return [0.0 if s.integer else n * 2.0 * s.bound / q * (1 + 1e-9) for s in self.specs]

    def to_json(self) -> str:
        values = asdict(self)
        values["specs"] = [{**asdict(s), "shape": list(s.shape)} for s in self.specs]
        values["client_config"] = dict(self.client_config)
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> SecureSumSettings:
        values = json.loads(text)
        values["specs"] = tuple(ArraySpec(**s) for s in values["specs"])
        return cls(**values)


def clip_count_spec(specs: Sequence[ArraySpec]) -> ArraySpec:
    """The extra integer array (one entry) holding a client's number of clipped entries."""
    return ArraySpec((1,), bound=max(1, sum(s.size for s in specs)), integer=True, name="clipped entries")


# ---------------------------------------------------------------- encoding (pure numpy)
def check_arrays(arrays: Sequence[Any], specs: Sequence[ArraySpec], who: str) -> list[np.ndarray]:
    """A client's statistics as float64 arrays, checked against the announced specs: count, shapes, finite, integers."""
    if not isinstance(arrays, (list, tuple)):
        raise SecureSumError(f"{who}: statistics must be a list of arrays, got {type(arrays).__name__}")
    if len(arrays) != len(specs):
        raise SecureSumError(f"{who}: {len(arrays)} arrays, the sum expects {len(specs)}")
    checked = []
    for index, (array, spec) in enumerate(zip(arrays, specs, strict=True)):
        name = spec.name or f"array {index}"
        try:
            value = np.asarray(array, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise SecureSumError(f"{who}: {name} is not numeric: {error}") from None
        if value.shape != spec.shape:
            raise SecureSumError(f"{who}: {name} has shape {value.shape}, the sum expects {spec.shape}")
        bad = int(np.count_nonzero(~np.isfinite(value)))
        if bad:
            raise SecureSumError(f"{who}: {name} holds {bad} non-finite value(s) (NaN or inf)")
        if spec.integer and not np.array_equal(value, np.round(value)):
            raise SecureSumError(f"{who}: {name} must hold integers")
        checked.append(value)
    return checked


def out_of_range(arrays: Sequence[np.ndarray], specs: Sequence[ArraySpec]) -> int:
    """How many entries exceed their array's public bound in absolute value."""
    return int(sum(np.count_nonzero(np.abs(a) > s.bound) for a, s in zip(arrays, specs, strict=True)))


def encode(arrays: Sequence[np.ndarray], specs: Sequence[ArraySpec], on_overflow: str = "clip",
           who: str = "client") -> tuple[list[np.ndarray], int]:
    """Checked statistics -> SecAgg+ parameters in [-8, 8] (``s * 8 / b``) plus the clip count as a last array.

    Returns the encoded arrays and the number of clipped entries; under ``on_overflow="raise"`` an entry
    beyond its bound is refused with :class:`SecureSumError`.
    """
    if on_overflow not in OVERFLOW_POLICIES:
        raise SecureSumError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    arrays = check_arrays(arrays, specs, who)
    clipped = out_of_range(arrays, specs)
    if clipped and on_overflow == "raise":
        raise SecureSumError(f"{who}: {clipped} entries exceed their public bound "
                             f"({', '.join(f'{s.name or i}: {s.bound:g}' for i, s in enumerate(specs))})")
    encoded = [np.clip(a, -s.bound, s.bound) * (CLIPPING_RANGE / s.bound) for a, s in zip(arrays, specs, strict=True)]
    count_spec = clip_count_spec(specs)
    encoded.append(np.array([clipped * (CLIPPING_RANGE / count_spec.bound)], dtype=np.float64))
    return encoded, clipped


def decode_mean(mean: Sequence[np.ndarray], specs: Sequence[ArraySpec], n_clients: int,
                quantization_range: int) -> tuple[list[np.ndarray], int]:
    """The workflow's dequantized mean of n encoded vectors -> (sum of the statistics, total clipped entries).

    First the exact integer sum S of the quantized values, ``(mean + 8) * n * Q / 16`` rounded; then
    ``(2 S / Q - n) * b`` per array; integer arrays are rounded.
    """
    every = (*specs, clip_count_spec(specs))
    if len(mean) != len(every):
        raise SecureSumError(f"the secure aggregate has {len(mean)} arrays, expected {len(every)}")
    q, n = int(quantization_range), int(n_clients)
    sums = []
    for index, (value, spec) in enumerate(zip(mean, every, strict=True)):
        value = np.asarray(value, dtype=np.float64)
        if value.shape != spec.shape:
            raise SecureSumError(f"the secure aggregate's array {index} has shape {value.shape}, "
                                 f"expected {spec.shape}")
        if not np.all(np.isfinite(value)):
            raise SecureSumError(f"the secure aggregate's array {index} holds non-finite values")
        integer_sum = np.rint((value + CLIPPING_RANGE) * (n * q / (2 * CLIPPING_RANGE)))
        total = (integer_sum * (2.0 / q) - n) * spec.bound
        sums.append(np.rint(total) if spec.integer else total)
    clipped = int(sums.pop()[0])
    return sums, clipped


# ---------------------------------------------------------------- PaDiM's statistics
def padim_specs(positions: int, n_features: int, max_images: int, feature_bound: float) -> tuple[ArraySpec, ...]:
    """Public specs of PaDiM's statistics: count (<= max_images), sum (P, k) and sum of outer products (P, k, k).

    ``feature_bound`` is the L2 norm every client clips each position's feature vector to (announced by
    the server), so ``|sum| <= N B`` and ``|outer| <= N B^2`` for N <= ``max_images`` images.
    """
    if max_images < 1 or not feature_bound > 0:
        raise SecureSumError(f"max_images must be >= 1 and feature_bound > 0, got {max_images}, {feature_bound}")
    return (ArraySpec((1,), max_images, integer=True, name="count"),
            ArraySpec((positions, n_features), max_images * feature_bound, name="sum"),
            ArraySpec((positions, n_features, n_features), max_images * feature_bound**2, name="sum_outer"))


def padim_statistics(features: np.ndarray, feature_bound: float) -> tuple[list[np.ndarray], int]:
    """A client's PaDiM statistics from its features (N, P, k), each position's vector clipped to L2 norm B.

    Returns ``[count (1,), sum (P, k), sum_outer (P, k, k)]`` (float64) and how many vectors were clipped
    (the same sums as :meth:`Padim.fit` on unclipped features when none was).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 3:
        raise SecureSumError(f"features must be (images, positions, features), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=2, keepdims=True)
    over = norms > feature_bound
    x = np.where(over, x * (feature_bound / np.maximum(norms, 1e-300)), x)
    return ([np.array([float(x.shape[0])]), x.sum(0), np.einsum("npi,npj->pij", x, x)], int(np.count_nonzero(over)))


# ---------------------------------------------------------------- traffic
def _record_bytes(message: Any) -> int:
    """Serialized size of a message's content (Flower's protobuf, as it travels in deployment; 0 for an error)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


class MeteredGrid:
    """A Grid that counts the bytes each node receives and sends, and the error replies (who dropped out, why)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.exchange_s: list[float] = []  # wall time of each send_and_receive (the clients' work and transport)
        self.metering_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        from fedinspect.federation.rounds_flower import error_reason

        messages = list(messages)
        start = time.perf_counter()
        for message in messages:
            node = message.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + _record_bytes(message)
        self.metering_s += time.perf_counter() - start
        start = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.exchange_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for reply in replies:
            node = reply.metadata.src_node_id
            self.up[node] = self.up.get(node, 0) + _record_bytes(reply)
            if reply.has_error() and node not in self.errors:
                self.errors[node] = (f"exchange {len(self.exchange_s)}: "
                                     f"{error_reason(reply.error.reason or f'error code {reply.error.code}')}")
        answered = {reply.metadata.src_node_id for reply in replies}
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered and node not in self.errors:
                self.errors[node] = f"exchange {len(self.exchange_s)}: no reply within {timeout} s"
        self.metering_s += time.perf_counter() - start
        return replies


# ---------------------------------------------------------------- client side
def _client(compute: Compute, partition: int, num_partitions: int, secure: bool) -> Any:
    from flwr.client import NumPyClient

    class StatisticsClient(NumPyClient):
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            settings = SecureSumSettings.from_json(str(config[CONFIG_KEY]))
            who = f"client partition {partition}"
            try:
                arrays = compute(partition, {"num-partitions": num_partitions, **settings.client_config})
            except SecureSumError:
                raise
            except Exception as error:
                raise SecureSumError(f"{who}: computing its statistics failed: {type(error).__name__}: {error}") \
                    from error
            metrics = {"partition-id": partition}
            if not secure:
                arrays = check_arrays(arrays, settings.specs, who)
                return arrays, 1, {**metrics, "out-of-range": out_of_range(arrays, settings.specs)}
            encoded, _ = encode(arrays, settings.specs, settings.on_overflow, who)
            # flwr's stochastic rounding draws from numpy's global generator: seed it, per client
            np.random.seed((settings.seed * 1_000_003 + partition) % 2**32)  # noqa: NPY002 (flwr draws from it)
            return encoded, 1, metrics  # weight 1 for all: the mean times n is the sum, and no count in the clear

    return StatisticsClient().to_client()


def refuse_with_reason(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A client mod: a :class:`SecureSumError` becomes an error reply carrying its message (this client drops out),
    instead of a traceback the transport truncates."""
    try:
        return call_next(msg, context)
    except SecureSumError as error:
        return Message(Error(code=CLIENT_ERROR, reason=f"SecureSumError: {error}"), reply_to=msg)


def make_client_app(compute: Compute, secure: bool = True) -> ClientApp:
    """A ClientApp that answers with ``compute(partition_id, config)``: encoded under SecAgg+ (``secaggplus_mod``)
    when ``secure``, else the raw float64 statistics. ``config`` holds ``num-partitions`` and the server's
    public ``client_config``."""
    from flwr.client.mod import secaggplus_mod

    def client_fn(context: Context) -> Any:
        node = context.node_config
        if "partition-id" not in node:
            raise SecureSumError("this SuperNode has no partition-id in its node config")
        return _client(compute, int(node["partition-id"]), int(node.get("num-partitions", 0)), secure)

    return ClientApp(client_fn=client_fn, mods=[refuse_with_reason, secaggplus_mod] if secure else [refuse_with_reason])


# ---------------------------------------------------------------- server side
@dataclass
class SecureSumResult:
    """The sum the server obtained, who contributed, and what it cost."""

    sum: list[np.ndarray]
    secure: bool
    contributors: list[int]  # partition ids
    dropped: dict[str, str]  # node -> reason
    out_of_range: int  # entries clipped (secure) or beyond their bound (plain), all clients together
    protocol: dict[str, Any]
    error_bound: list[float]
    aggregation_s: float  # the ServerApp's workflow, traffic metering excluded
    bytes_down: dict[int, int]  # per node: server -> client
    bytes_up: dict[int, int]  # per node: client -> server
    exchange_s: list[float]  # each message exchange (secure: setup, share keys, masked vectors, unmask)
    wall_s: float = 0.0  # the whole simulation (Ray start included), set by secure_sum_simulation

    @property
    def bytes_per_client(self) -> float:
        """Mean bytes one client receives plus sends."""
        nodes = set(self.bytes_down) | set(self.bytes_up)
        return sum(self.bytes_down.get(n, 0) + self.bytes_up.get(n, 0) for n in nodes) / max(1, len(nodes))


class _SumStrategy:
    """A legacy Strategy that selects every client and, instead of averaging, records the (decoded) sum."""

    def __init__(self, settings: SecureSumSettings, n_clients: int, secure: bool, connect_timeout: float) -> None:
        from flwr.server.strategy import Strategy

        self.settings, self.n, self.secure, self.connect_timeout = settings, n_clients, secure, connect_timeout
        self.protocol = settings.protocol(n_clients)
        self.outcome: dict[str, Any] = {}
        outer = self

        class Impl(Strategy):
            def initialize_parameters(self, client_manager: Any) -> Any:
                from flwr.common import Parameters

                return Parameters(tensors=[], tensor_type="numpy.ndarray")

            def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
                from flwr.common import FitIns

                if not client_manager.wait_for(outer.n, timeout=int(outer.connect_timeout)):
                    raise SecureSumError(f"only {client_manager.num_available()} of {outer.n} clients connected "
                                         f"within {outer.connect_timeout:g} s")
                clients = client_manager.sample(num_clients=outer.n, min_num_clients=outer.n)
                return [(c, FitIns(parameters, {CONFIG_KEY: outer.settings.to_json()})) for c in clients]

            def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
                outer.outcome.update(outer.conclude(results))
                return None, {}

            def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
                return []

            def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
                return None, {}

            def evaluate(self, server_round: int, parameters: Any) -> None:
                return None

        self.strategy = Impl()

    def conclude(self, results: list) -> dict[str, Any]:
        """The sum from the clients' results (secure: each carries the workflow's aggregate; plain: its own arrays)."""
        from flwr.common import parameters_to_ndarrays

        contributors = []
        for _, fitres in results:
            partition = fitres.metrics.get("partition-id")
            if not isinstance(partition, int) or isinstance(partition, bool):
                raise SecureSumError(f"a client's reply names no partition-id: {fitres.metrics!r}")
            contributors.append(partition)
        if len(set(contributors)) != len(contributors):
            raise SecureSumError(f"several replies claim the same partition: {sorted(contributors)}")
        order = np.argsort(contributors)
        if self.secure:
            mean = parameters_to_ndarrays(results[0][1].parameters)
            total, clipped = decode_mean(mean, self.settings.specs, len(results), self.protocol["quantization_range"])
        else:
            total, clipped = None, 0
            for index in order:  # partition order: the float64 sum does not depend on who answered first
                _, fitres = results[index]
                who = f"client partition {contributors[index]}"
                arrays = check_arrays(parameters_to_ndarrays(fitres.parameters), self.settings.specs, who)
                reported = fitres.metrics.get("out-of-range", 0)
                clipped += int(reported) if isinstance(reported, int) else 0
                total = arrays if total is None else [t + a for t, a in zip(total, arrays, strict=True)]
        return {"sum": total, "contributors": sorted(contributors), "out_of_range": clipped}


def make_server_app(settings: SecureSumSettings, n_clients: int, sink: dict[str, Any], secure: bool = True,
                    connect_timeout: float = 600.0) -> ServerApp:
    """A ServerApp that obtains the sum of ``n_clients`` clients' statistics; ``sink["results"]`` receives the
    :class:`SecureSumResult` (``sink["error"]`` the error raised). ``secure``: SecAgg+; else plain FedAvg-style
    collection of the raw arrays (the reference)."""
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            collector = _SumStrategy(settings, n_clients, secure, connect_timeout)
            protocol = collector.protocol
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=collector.strategy)
            fit_workflow = None
            if secure:
                fit_workflow = SecAggPlusWorkflow(
                    num_shares=protocol["num_shares"], reconstruction_threshold=protocol["reconstruction_threshold"],
                    max_weight=1.0, clipping_range=CLIPPING_RANGE, quantization_range=protocol["quantization_range"],
                    modulus_range=MODULUS, timeout=settings.timeout)
            metered = MeteredGrid(grid)
            start = time.perf_counter()
            DefaultWorkflow(fit_workflow=fit_workflow)(metered, legacy)
            elapsed = time.perf_counter() - start - metered.metering_s
            dropped = {str(node): reason for node, reason in sorted(metered.errors.items())}
            outcome = collector.outcome
            if "sum" not in outcome:
                raise SecureSumError(f"secure aggregation halted without a sum: fewer than reconstruction_threshold = "
                                     f"{protocol['reconstruction_threshold']} clients left, or a client dropped out "
                                     "before its key shares were out (exchange 1 or 2), which flwr 1.41 does not "
                                     f"recover from. Per node (exchanges: 1 setup, 2 share keys, 3 masked vectors, "
                                     f"4 unmask): {dropped or 'none'}")
            if len(outcome["contributors"]) < protocol["min_clients"]:
                raise SecureSumError(f"only {len(outcome['contributors'])} of {n_clients} clients contributed "
                                     f"(min_clients = {protocol['min_clients']}); the partial sum is refused. "
                                     f"Dropped: {dropped}")
            contributed = len(outcome["contributors"])
            bounds = settings.error_bound(n_clients, contributed) if secure else [0.0] * len(settings.specs)
            sink["results"] = SecureSumResult(
                sum=outcome["sum"], secure=secure, contributors=outcome["contributors"], dropped=dropped,
                out_of_range=outcome["out_of_range"],
                protocol={**protocol, "clipping_range": CLIPPING_RANGE, "modulus_range": MODULUS} if secure else {},
                error_bound=bounds,
                aggregation_s=elapsed, bytes_down=dict(metered.down), bytes_up=dict(metered.up),
                exchange_s=list(metered.exchange_s))
        except BaseException as error:
            sink["error"] = error
            raise

    return app


def secure_sum_simulation(compute: Compute, n_clients: int, settings: SecureSumSettings, *, secure: bool = True,
                          progress: bool = False, cpus_per_client: float = 1.0,
                          backend_config: dict[str, Any] | None = None) -> SecureSumResult:
    """Run the secure sum (or, ``secure=False``, the plain one) on Flower's Simulation Engine: one virtual
    SuperNode per client, client i computing ``compute(i, config)``. Returns the :class:`SecureSumResult`
    with the wall time of the whole simulation; raises :class:`SecureSumError` when it cannot be formed."""
    from fedinspect.federation.rounds_flower import simulate, simulation_backend

    settings.protocol(n_clients)  # bad settings fail here, before Ray starts
    if backend_config is None:
        backend_config = simulation_backend(n_clients, cpus_per_client)
        # n masked vectors travel through Ray's object store at once: give it room for them
        size = 8 * sum(s.size for s in settings.specs)
        backend_config["init_args"]["object_store_memory"] = int(max(256 * 2**20, min(4 * 2**30, 3 * n_clients * size)))
    sink: dict[str, Any] = {}
    start = time.perf_counter()
    result = simulate(make_server_app(settings, n_clients, sink, secure), make_client_app(compute, secure),
                      n_clients, backend_config, sink, progress)
    result.wall_s = time.perf_counter() - start
    return result


def plain_sum_simulation(compute: Compute, n_clients: int, settings: SecureSumSettings, **options: Any
                         ) -> SecureSumResult:
    """The non-secure counterpart: every client sends its raw float64 statistics, the server adds them."""
    return secure_sum_simulation(compute, n_clients, settings, secure=False, **options)
