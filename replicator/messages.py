"""Peer protocol messages: every message between blockd hosts, one frozen dataclass each.

Type ids are part of the wire format (replicator/codec.py): never renumber, only add.
Every data message carries volume, lineage, chunk index and the sender's epoch; writes also
carry the fencing token of the gateway's lease (DESIGN.md, Words), so a replica can refuse a
write from a gateway that lost its lease or lives in an older cluster map.

Field types are limited to str, int, bool, bytes, `int | None` and `tuple[int, ...]`; the codec
derives its validation from the annotations below, so a new field of another type fails at
import time instead of on the wire.

Evolving a message: add a field with a default at its end, never a required one, and bump
PEER_REV. The codec sends an optional field only when it differs from its default and
decodes frames that leave it out (replicator/codec.py); senders clear it for hosts of an
older revision, so peers that predate the field keep talking.

`rid` on the client-facing data messages is the id of the NBD request that caused them
(vbp.reqid), "" for background work: the replica logs it, so one grep follows a write
across hosts. Not to be confused with the frame's request_id, which pairs a reply with its
request on one connection.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Union

PROTO_VERSION = 1
# Revision of the messages within PROTO_VERSION, advertised in the host's registry record
# (vbp.cluster.HostRecord.peer_rev). A decoder of an older revision refuses a frame with
# fields it does not know, so a sender sends optional fields only to hosts that advertise
# the revision that added them: a pool keeps working while its hosts are upgraded one by
# one. 1: `rid` on ReadChunk, WriteChunk, ZeroChunk, Flush, ChunkExtents. 2: `allow_stale`
# on ReadChunk (sent by resync only) and `stale` on Ok (sent only when true). 3: the
# ChunkIndexes request (sent only to hosts of revision 3 or later). 4: no new field; the
# host places chunks by the data set's weight factors (vbp.cluster.ClusterMap.weights), so
# the controller reweights only once every host is at 4. 5: the DirtyChunks request (sent
# only to hosts of revision 5 or later). 6: `boot` on HelloOk (sent only to hosts of
# revision 6 or later). 7: the WriteBatch request (sent only to hosts of revision 7 or
# later). 8: the CollectedGens request, and ReadChunk.token (both sent only to hosts of
# revision 8 or later). 9: the WantLease request (sent only to hosts of revision 9 or
# later). 10: peer authentication, `nonce` on Hello, `nonce` and `proof` on HelloOk, the
# Auth message (sent only by hosts given a peer secret, which every host of such a pool
# must have: a host of an older revision cannot take part). 11: no new field; the
# all-stale election reads a stale record's LACKS_EARLIER flag (replicator.loss), which
# hosts below 11 do not: it does so only once every host is at 11, so all elect alike.
# 12: the RangeExtents request (sent only to hosts of revision 12 or later).
PEER_REV = 12
BOOT_REV = 6  # HelloOk.boot
BATCH_REV = 7  # WriteBatch
# Items a replica takes in one WriteBatch (the gateway sends gateway.BATCH_ITEMS at most):
# each costs the replica's event loop a few µs and its sender 3 bytes, so a frame of
# millions of them would hold every other peer up for seconds. More is refused whole.
BATCH_ITEMS_MAX = 1024
COLLECTED_REV = 8  # CollectedGens
READ_TOKEN_REV = 8  # ReadChunk.token
WANT_LEASE_REV = 9  # WantLease
AUTH_REV = 10  # Hello.nonce, HelloOk.nonce and .proof, Auth
LACKS_REV = 11  # the election reads LACKS_EARLIER (replicator.loss.reads_lacks)
RANGE_EXTENTS_REV = 12  # RangeExtents
# Chunks a replica answers in one RangeExtents: each costs its event loop about a µs (a
# lookup in the index, a few runs), so 4096 keep a request near a few ms; more is
# refused whole. A gateway's block status asks for 4 GiB at most, 1024 chunks of 4 MiB.
RANGE_CHUNKS_MAX = 4096
# Runs after which a replica stops answering a RangeExtents (after the chunk that passed
# it; the gateway asks again for the rest): a reply of a few hundred KiB at most, however
# fragmented the chunks.
RANGE_RUNS_MAX = 16384

# Error codes (replicator/errors.py maps them to vbp.errors classes, in one place).
FENCED = "fenced"
STALE_EPOCH = "stale_epoch"
NOT_FOUND = "not_found"
NO_SPACE = "no_space"
CHECKSUM = "checksum"
INVALID = "invalid"
INTERNAL = "internal"
VERSION = "version"
CLUSTER = "cluster"
UNAVAILABLE = "unavailable"
AUTH = "auth"  # peer authentication refused or failed (PEER_REV 10)
ERROR_CODES = frozenset(
    {FENCED, STALE_EPOCH, NOT_FOUND, NO_SPACE, CHECKSUM, INVALID, INTERNAL, VERSION, CLUSTER,
     UNAVAILABLE, AUTH}
)

MESSAGE_TYPES: dict[int, type] = {}  # type id -> class
TYPE_IDS: dict[type, int] = {}  # class -> type id


def _message(type_id: int):
    def register(cls):
        assert type_id not in MESSAGE_TYPES, type_id
        assert 0 < type_id < 128, type_id  # one msgpack byte
        MESSAGE_TYPES[type_id] = cls
        TYPE_IDS[cls] = type_id
        return cls

    return register


# --- session -----------------------------------------------------------------------------


@_message(1)
@dataclass(frozen=True, slots=True)
class Hello:
    """First message of a connection, client to server. `nonce`: with a peer secret
    (PEER_REV 10), the client's challenge, 16 random bytes in hex: the server proves it
    knows the secret in its HelloOk, then the client in an Auth (replicator.transport,
    peer authentication)."""

    cluster: str
    host_id: str
    version: int
    nonce: str = ""


@_message(2)
@dataclass(frozen=True, slots=True)
class HelloOk:
    """The server's answer to Hello. `boot` names the server's process: a random id drawn
    when it started serving, the same on every connection until it stops (PEER_REV 6; ""
    from older hosts). A client that reconnects and meets the same boot id knows it talks
    to the process that answered it before, which still holds what it took then: a network
    blip is not a restart (PeerPool.incarnation)."""

    cluster: str
    host_id: str
    version: int
    boot: str = ""
    nonce: str = ""  # with a peer secret: the server's challenge (PEER_REV 10), in hex
    proof: str = ""  # and its answer to the client's (an HMAC-SHA256, in hex)


@_message(3)
@dataclass(frozen=True, slots=True)
class Error:
    """A refused or failed request; `code` is one of ERROR_CODES (unknown codes are kept)."""

    code: str
    message: str


@_message(4)
@dataclass(frozen=True, slots=True)
class Ping:
    epoch: int


@_message(5)
@dataclass(frozen=True, slots=True)
class Pong:
    host_id: str
    epoch: int


# --- chunk I/O ---------------------------------------------------------------------------


@_message(10)
@dataclass(frozen=True, slots=True)
class ReadChunk:
    """Read [offset, offset+length) of the newest generation of `chain` held locally.

    `chain` lists the generations the reader can see, oldest first, ending with the one
    it reads as (vbp.volume: a volume head's or a snapshot's chain)."""

    volume: str
    lineage: str
    index: int
    chain: tuple[int, ...]
    offset: int
    length: int
    epoch: int
    rid: str = ""
    # a resync electing the freshest of copies that are all stale reads a stale copy
    allow_stale: bool = False
    # the reading gateway's fencing token when it holds the volume's write lease (0: not
    # a holder, or a host below READ_TOKEN_REV): a replica that has seen a newer one for
    # the volume refuses the read (Fenced), as it refuses the writes of a deposed holder
    token: int = 0


@_message(11)
@dataclass(frozen=True, slots=True)
class Data:
    """Reply to ReadChunk. `gen` is the generation read, -1 when none of the chain exists
    locally (then `data` is empty)."""

    data: bytes
    version: int
    gen: int


@_message(12)
@dataclass(frozen=True, slots=True)
class WriteChunk:
    """Write `data` at `offset` of chunk (lineage, index, gen). `chain` is the volume's
    ancestry, oldest first, ending with `gen`: when gen does not exist yet on the replica,
    the newest older generation of the chain it holds is copied up locally first."""

    volume: str
    lineage: str
    index: int
    gen: int
    chain: tuple[int, ...]
    offset: int
    data: bytes
    chunk_size: int
    version: int
    fua: bool
    epoch: int
    token: int
    rid: str = ""


@_message(13)
@dataclass(frozen=True, slots=True)
class ZeroChunk:
    volume: str
    lineage: str
    index: int
    gen: int
    chain: tuple[int, ...]
    offset: int
    length: int
    chunk_size: int
    version: int
    fua: bool
    epoch: int
    token: int
    rid: str = ""


@_message(14)
@dataclass(frozen=True, slots=True)
class Flush:
    volume: str
    epoch: int
    token: int
    rid: str = ""


@_message(15)
@dataclass(frozen=True, slots=True)
class Ok:
    version: int
    # the replica's copy of the chunk is recorded stale (it missed earlier writes): it took
    # this one, but it is not a current copy and does not count towards min_size
    stale: bool = False


@_message(16)
@dataclass(frozen=True, slots=True)
class ChunkState:
    lineage: str
    index: int
    gen: int


@_message(17)
@dataclass(frozen=True, slots=True)
class ChunkStateReply:
    """`checksums`: one xxhash per 4 KiB page of the chunk (empty when it does not exist)."""

    exists: bool
    version: int
    checksums: tuple[int, ...]


@_message(18)
@dataclass(frozen=True, slots=True)
class ChunkExtents:
    """Allocation of [offset, offset+length) of the newest generation of `chain` held
    locally, for NBD_CMD_BLOCK_STATUS."""

    lineage: str
    index: int
    chain: tuple[int, ...]
    offset: int
    length: int
    epoch: int
    rid: str = ""


@_message(19)
@dataclass(frozen=True, slots=True)
class Extents:
    """Reply to ChunkExtents: `runs` is (length, is_hole) pairs flattened; `found` is False
    when no generation of the chain exists on the replica (the whole range is a hole)."""

    found: bool
    runs: tuple[int, ...]


@_message(30)
@dataclass(frozen=True, slots=True)
class RangeExtents:
    """ChunkExtents for many chunks of `lineage` at once (PEER_REV 12), for a block status
    over a range of a thin volume: one request per host, not one per chunk. Chunk i
    covers [i * chunk_size, (i + 1) * chunk_size) of the lineage, and its part within
    [start, end) is asked, through the newest generation of `chain` held here. The chunks
    are `indexes` (ascending), or with none given every chunk [start, end) touches; at
    most RANGE_CHUNKS_MAX either way. Reply: RangeRuns."""

    lineage: str
    chain: tuple[int, ...]
    chunk_size: int
    start: int
    end: int
    epoch: int
    indexes: tuple[int, ...] = ()
    rid: str = ""


@_message(31)
@dataclass(frozen=True, slots=True)
class RangeRuns:
    """Reply to RangeExtents: its first `done` chunks are answered (all of them unless
    their runs passed RANGE_RUNS_MAX; at least one), and of those, the chunks not a hole
    here are `indexes`, ascending: `states[k]` is -1 when this host's copy of chunk
    indexes[k] is stale (ask another copy), else its number of runs, which come next in
    `runs`, (length, is_hole) pairs flattened as in Extents. A chunk of the first `done`
    not in `indexes` has no generation of the chain here: a hole."""

    done: int
    indexes: tuple[int, ...]
    states: tuple[int, ...]
    runs: tuple[int, ...]


@_message(20)
@dataclass(frozen=True, slots=True)
class ChunkGens:
    """Which generations of chunk (lineage, index) does the replica hold? For resync."""

    lineage: str
    index: int


@_message(21)
@dataclass(frozen=True, slots=True)
class Gens:
    gens: tuple[int, ...]


@_message(22)
@dataclass(frozen=True, slots=True)
class ChunkIndexes:
    """Which chunks of `lineage` does the host hold (any generation)? Asked by a host that
    came back with a new, empty store, to learn which of its copies are missing (PEER_REV 3)."""

    lineage: str


@_message(23)
@dataclass(frozen=True, slots=True)
class Indexes:
    indexes: tuple[int, ...]


@_message(24)
@dataclass(frozen=True, slots=True)
class DirtyChunks:
    """Which chunks of generation `gen` of `lineage` took writes here since the last flush,
    or writes not known settled (Replica.recently_written: the holder died or was taken
    over before it showed they were)?
    Asked by a gateway that took over a volume's lease from a holder that never released
    it, to find the chunks that holder may have left divergent (PEER_REV 5). Reply: Indexes."""

    lineage: str
    gen: int


# --- scrub (ids 40..49, kept apart from recovery's so parallel work never collides) -----------


@_message(40)
@dataclass(frozen=True, slots=True)
class ScrubChunk:
    """Verify your copy of chunk (lineage, index, gen): reread every page and check it
    against its stored checksum (replicator/scrub.py)."""

    lineage: str
    index: int
    gen: int
    epoch: int


@_message(41)
@dataclass(frozen=True, slots=True)
class ScrubState:
    """Reply to ScrubChunk. `checksums`: the stored xxhash per 4 KiB page (0 = hole);
    `bad`: pages whose bytes do not match their stored checksum; `stale`: this host knows
    its copy is stale (being resynced). All empty when the chunk does not exist."""

    exists: bool
    stale: bool
    version: int
    checksums: tuple[int, ...]
    bad: tuple[int, ...]


@_message(42)
@dataclass(frozen=True, slots=True)
class RepairPages:
    """Overwrite pages [first, first + len(expect)) of chunk (lineage, index, gen) with
    `data` (or make them holes when `hole`), but only if their stored checksums are still
    `expect` and the chunk's version is still `version`: a write that landed since the
    scrubber looked wins, and the scrubber looks again on its next pass. The version is
    kept (a repair is not a new write)."""

    lineage: str
    index: int
    gen: int
    chunk_size: int
    first: int
    expect: tuple[int, ...]
    version: int
    hole: bool
    epoch: int
    data: bytes


@_message(43)
@dataclass(frozen=True, slots=True)
class Repaired:
    """Reply to RepairPages: `applied` is False when the pages changed meanwhile."""

    applied: bool
    version: int


@_message(25)
@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Small writes to chunks of one volume, one frame for what would be one WriteChunk
    each (PEER_REV 7): item i writes `data[sum(lengths[:i]):][:lengths[i]]` at
    `offsets[i]` of chunk `indexes[i]`, in order, with the other fields of a WriteChunk
    common to all of them. Reply: Written, or one Error for the whole batch (a replica
    stops at the first item it refuses; the items before it are applied). `rid`: the
    request ids of the items, space-separated, so one grep still finds each."""

    volume: str
    lineage: str
    gen: int
    chain: tuple[int, ...]
    indexes: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data: bytes
    chunk_size: int
    fua: bool
    epoch: int
    token: int
    rid: str = ""


@_message(26)
@dataclass(frozen=True, slots=True)
class Written:
    """Reply to WriteBatch: every item was applied; `stale` lists the positions of the items
    whose chunk's copy here is recorded stale (Ok.stale, item by item)."""

    stale: tuple[int, ...] = ()


@_message(27)
@dataclass(frozen=True, slots=True)
class CollectedGens:
    """Which generations of `lineage` did the host's garbage collection free as read by
    no volume, snapshot or clone any more (ChunkStore.collected_gens)? Asked by a resync
    about to drop generations its source lacks (PEER_REV 8). Reply: Gens."""

    lineage: str


@_message(28)
@dataclass(frozen=True, slots=True)
class WantLease:
    """The sender waits for the write lease of `volume`, which the registry shows held by
    the receiver with `token` (PEER_REV 9): a gateway there holding it idle (nothing in
    flight, everything flushed: a live-migrated VM's source) hands it back, as RBD's
    exclusive lock is passed on request. Reply: Ok(0), at once; the sender sees the lease
    free at its next try."""

    volume: str
    token: int


@_message(29)
@dataclass(frozen=True, slots=True)
class Auth:
    """With a peer secret (PEER_REV 10), the client's answer to the server's challenge
    (HelloOk.nonce), its first frame after the HelloOk; nothing else is served before it.
    No reply: a wrong one gets an Error and the end of the connection."""

    proof: str


Message = Union[
    Hello, HelloOk, Error, Ping, Pong, ReadChunk, Data, WriteChunk, ZeroChunk, Flush, Ok,
    ChunkState, ChunkStateReply, ChunkExtents, Extents, ChunkGens, Gens, ChunkIndexes, Indexes,
    DirtyChunks, ScrubChunk, ScrubState, RepairPages, Repaired, WriteBatch, Written,
    CollectedGens, WantLease, Auth, RangeExtents, RangeRuns,
]

# request type -> the reply type a well-behaved peer answers with (or Error)
REPLY_TYPES: dict[type, type] = {
    Hello: HelloOk,
    Ping: Pong,
    ReadChunk: Data,
    WriteChunk: Ok,
    WriteBatch: Written,
    ZeroChunk: Ok,
    Flush: Ok,
    ChunkState: ChunkStateReply,
    ChunkExtents: Extents,
    RangeExtents: RangeRuns,
    ChunkGens: Gens,
    CollectedGens: Gens,
    WantLease: Ok,
    ChunkIndexes: Indexes,
    DirtyChunks: Indexes,
    ScrubChunk: ScrubState,
    RepairPages: Repaired,
}


def maker(cls, order: tuple[str, ...] | None = None):
    """`cls(...)` for a hot path, same arguments (positional, in field order, defaults
    included): it sets the slots directly. A frozen dataclass's __init__ goes through
    object.__setattr__ for every field, twice the cost (3.0 against 1.5 us for WriteChunk,
    built once per replicated write). No validation either way: the codec checks what it
    sends, and validates what it receives before it builds a message with this (its
    arguments in wire `order`, every one of them given)."""
    fields = cls.__dataclass_fields__
    names = list(order if order is not None else fields)
    env = {"new": object.__new__, "cls": cls}
    params = []
    for name in names:
        f = fields[name]
        assert f.default_factory is MISSING, (cls, name)  # messages have plain defaults
        if f.default is not MISSING and order is None:
            env[f"default_{name}"] = f.default
            params.append(f"{name}=default_{name}")
        else:
            params.append(name)
    lines = [f"def make({', '.join(params)}):", "    o = new(cls)"]
    for name in names:
        env[f"set_{name}"] = cls.__dict__[name].__set__
        lines.append(f"    set_{name}(o, {name})")
    lines.append("    return o")
    exec("\n".join(lines), env)
    make = env["make"]
    make.__name__ = make.__qualname__ = f"make_{cls.__name__}"
    return make


new_write_chunk = maker(WriteChunk)
new_ok = maker(Ok)  # every write's reply
new_write_batch = maker(WriteBatch)
