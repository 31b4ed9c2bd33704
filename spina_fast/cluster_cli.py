"""``spina cluster ...`` and ``spina snapshot ...``, and the Raft flags of ``spina agent``.

    spina cluster status                       # this node's Raft view: role, term, indexes, members
    spina cluster join n4 127.0.0.1:8731       # add a learner (``spina agent --join`` does this itself)
    spina cluster remove n2                    # remove a member (the leader hands over first)
    spina cluster transfer-leader [--to n3]    # move leadership (default: the most up-to-date voter)
    spina snapshot save backup.snap            # a consistent snapshot of a live cluster, CRC-checked
    spina snapshot inspect backup.snap         # verify a file, print its index, term and size
    spina snapshot restore backup.snap --data-dir DIR   # seed a new node's data dir from a backup
    spina agent ... --backup-dir /backups/c1 --backup-interval 5   # continuous backup (change data capture)
    spina snapshot inspect --from-backup /backups/c1    # verify it; print what it can be restored to
    spina snapshot restore --from-backup /backups/c1 --to-time 2024-05-01T12:00:00Z --data-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from spina_fast.config import DEFAULT_HTTP_ADDR, parse_host_port
from spina_fast.errors import InvalidRequest

__all__ = ["add_agent_flags", "add_parsers", "agent_config_fields", "run_cluster", "run_snapshot"]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].lower() in units else (text, "")
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1048576, 512k, 64m or 1g")
    return int(number) * units.get(unit, 1)


def add_agent_flags(agent: argparse.ArgumentParser) -> None:
    group = agent.add_argument_group(
        "cluster membership and snapshots",
        "A new cluster starts from --peers (the initial voters, the same set on every node). Later changes "
        "go through the log: start an extra node with an empty --data-dir and --join pointing at any member's "
        "HTTP address; it joins as a learner and becomes a voter once caught up. On restart a node takes its "
        "members from its own data (--peers and --join are then only used if it has none).")
    group.add_argument("--join", default=None, metavar="HOST:PORT",
                       help="HTTP address of a running member to join through (instead of --peers)")
    group.add_argument("--snapshot-entries", type=_positive, default=100_000, metavar="N",
                       help="snapshot the state and compact the log every N applied entries (default 100000, as etcd)")
    group.add_argument("--snapshot-bytes", type=_size, default=64 << 20, metavar="SIZE",
                       help="... or every SIZE bytes of applied commands, e.g. 64m (default 64m)")
    group.add_argument("--snapshot-catch-up", type=int, default=1_000, metavar="N",
                       help="entries kept behind a snapshot for followers that lag a little (default 1000)")


    backup = agent.add_argument_group(
        "continuous backup",
        "Every entry this node applies is shipped to DIR/<node-id>/ as sealed, CRC-checked segment files, plus "
        "base snapshots, so that 'spina snapshot restore --from-backup DIR' can rebuild the state as of any "
        "committed index or time. Give every node the same DIR (a shared or object-store-like folder) or its "
        "own: each node writes its own stream, and a restore merges the streams it finds.")
    backup.add_argument("--backup-dir", type=Path, default=None, metavar="DIR",
                        help="ship committed entries here (off by default)")
    backup.add_argument("--backup-interval", type=float, default=10.0, metavar="SECONDS",
                        help="seal and fsync a segment at least this often; this is the RPO: an entry is in the "
                             "backup at most this long after it was applied (0.1..60, default 10)")
    backup.add_argument("--backup-base-interval", type=float, default=600.0, metavar="SECONDS",
                        help="copy this node's newest snapshot into the backup at most this often, so a restore "
                             "replays only the entries after it (0: every snapshot; default 600)")


def agent_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The AgentConfig fields the flags of ``add_agent_flags`` set (ValueError for a bad address)."""
    return {"join": parse_host_port(args.join, what="--join") if args.join else None,
            "snapshot_entries": args.snapshot_entries, "snapshot_bytes": args.snapshot_bytes,
            "snapshot_catch_up_entries": args.snapshot_catch_up, "backup_dir": args.backup_dir,
            "backup_interval": args.backup_interval, "backup_base_interval": args.backup_base_interval}


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    cluster = commands.add_parser(
        "cluster", help="Raft cluster: status, join, remove, transfer-leader",
        description="Inspect and change the Raft cluster through any member (changes go to the leader). "
                    "Membership changes are single-server (Raft §4.1): one at a time, new nodes first as "
                    "non-voting learners.")
    cluster.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, metavar="HOST:PORT", help="the agent to talk to")
    actions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    actions.required = True
    status = actions.add_parser("status", help="this node's view: role, term, indexes, voters, learners")
    status.add_argument("--json", action="store_true", help="the agent's JSON document")
    join = actions.add_parser("join", help="add a node as a learner (promoted to voter once caught up)",
                              description="Add NODE_ID, whose Raft port is RAFT_ADDR, as a learner. Start it with "
                                          "'spina agent --node-id NODE_ID --raft-addr RAFT_ADDR --join HTTP' "
                                          "(which also asks to join, so this step is optional).")
    join.add_argument("node_id")
    join.add_argument("raft_addr", metavar="RAFT_ADDR")
    remove = actions.add_parser("remove", help="remove a voter or learner (the leader hands over first)")
    remove.add_argument("node_id")
    transfer = actions.add_parser("transfer-leader", help="hand leadership to another voter")
    transfer.add_argument("--to", default=None, metavar="NODE_ID",
                          help="the new leader (default: the most up-to-date voter)")

    snapshot = commands.add_parser(
        "snapshot", help="back up and restore the replicated state",
        description="Backups are snapshot files: the state machine at one Raft index, with its term and a "
                    "CRC-32C over the whole file. 'save' takes a linearizable snapshot from a live cluster; "
                    "'restore' seeds an empty data dir from one, for a new cluster (restore the same file into "
                    "every node's data dir, then start the nodes with --peers as for a new cluster). With "
                    "--from-backup, the state is rebuilt from a continuous backup (spina agent --backup-dir) as "
                    "of a committed index or time.")
    snapshot.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, metavar="HOST:PORT",
                          help="the agent to talk to (save)")
    snapshot_actions = snapshot.add_subparsers(dest="snapshot_command", metavar="ACTION")
    snapshot_actions.required = True
    save = snapshot_actions.add_parser("save", help="download a consistent snapshot into FILE")
    save.add_argument("file", type=Path)
    inspect = snapshot_actions.add_parser(
        "inspect", help="verify FILE (or a continuous backup) and print what it holds",
        description="Verify a snapshot FILE and print its index, term and size; or, with --from-backup, verify "
                    "every file of a continuous backup and print its streams, the range of indexes and times it "
                    "can be restored to, and the achieved RPO (how long entries waited before being sealed).")
    inspect.add_argument("file", type=Path, nargs="?")
    inspect.add_argument("--from-backup", type=Path, action="append", metavar="DIR",
                         help="a --backup-dir folder (or one node's stream in it); may be repeated")
    restore = snapshot_actions.add_parser(
        "restore", help="seed an empty data dir from FILE or from a continuous backup",
        description="Seed an empty data dir from a snapshot FILE, or from a continuous backup (--from-backup) as "
                    "of --to-index N or --to-time T (default: the newest index it holds). A damaged or truncated "
                    "file, or a range of indexes missing from every stream, is refused and nothing is written.")
    restore.add_argument("file", type=Path, nargs="?")
    restore.add_argument("--data-dir", type=Path, required=True, help="the new node's (empty) data dir")
    restore.add_argument("--from-backup", type=Path, action="append", metavar="DIR",
                         help="a --backup-dir folder (or one node's stream in it); may be repeated")
    target = restore.add_mutually_exclusive_group()
    target.add_argument("--to-index", type=_positive, metavar="N", help="the state as of committed index N")
    target.add_argument("--to-time", metavar="T",
                        help="the state as of time T: everything committed at or before it (unix seconds or ISO "
                             "8601 like 2024-05-01T12:00:00Z, UTC unless an offset is given)")


def _print_status(status: dict[str, Any]) -> None:
    print(f"node {status['node_id']}: {status['role']}, term {status['term']}, leader {status['leader'] or '-'}")
    print(f"  commit {status['commit_index']}  applied {status['applied_index']}  log {status['first_index']}.."
          f"{status['last_index']}  snapshot {status['snapshot_index']}")
    progress = status.get("progress", {})
    for kind in ("voters", "learners"):
        for member, address in status[kind].items():
            detail = progress.get(member)
            lag = f"  match {detail['match_index']} ({detail['state']})" if detail else ""
            print(f"  {kind[:-1]:7} {member:12} {address}{lag}")
    print(f"  state hash {status['state_hash']}")


def run_cluster(args: argparse.Namespace) -> int:
    from spina_fast.client.http import AgentClient

    client = AgentClient(args.http_addr)
    command = args.cluster_command
    if command == "status":
        status = client.request("GET", "/v1/spina/cluster/status?hash").json()
        assert isinstance(status, dict)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0
    if command == "transfer-leader":
        body = {"to": args.to} if args.to else {}
        result = client.request("POST", "/v1/spina/cluster/transfer-leader", body=json.dumps(body).encode()).json()
        assert isinstance(result, dict)
        print(f"leader is now {result['leader']}")
        return 0
    if command == "join":
        parse_host_port(args.raft_addr, what="RAFT_ADDR")
        body = {"node_id": args.node_id, "raft_addr": args.raft_addr}
        result = client.request("POST", "/v1/spina/cluster/join", body=json.dumps(body).encode()).json()
    else:
        result = client.request("POST", "/v1/spina/cluster/remove",
                                body=json.dumps({"node_id": args.node_id}).encode()).json()
    assert isinstance(result, dict)
    config = result["config"]
    verb = "changed" if result.get("changed") else "unchanged (already so)"
    print(f"configuration {verb}: voters {', '.join(sorted(config['voters']))}; "
          f"learners {', '.join(sorted(config['learners'])) or '-'}")
    return 0


def _save(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from spina_fast.raft.snapshots import verify_snapshot_file

    base = args.http_addr if args.http_addr.startswith("http") else f"http://{args.http_addr}"
    target: Path = args.file
    temp = target.with_name(target.name + ".part")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(base + "/v1/spina/snapshot", timeout=120) as response, temp.open("wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as exc:
        temp.unlink(missing_ok=True)
        print(f"spina snapshot save: the agent refused: {exc.code} {exc.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        temp.unlink(missing_ok=True)
        print(f"spina snapshot save: {exc}", file=sys.stderr)
        return 1
    try:
        meta = verify_snapshot_file(temp)  # a download cut short must not pass for a backup
    except Exception:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, target)
    print(f"saved {target}: index {meta.index}, term {meta.term}, {target.stat().st_size} bytes "
          f"in {time.monotonic() - started:.2f}s")
    return 0


def restore_snapshot(source: Path, data_dir: Path) -> tuple[int, int]:
    """Seed ``data_dir`` from a snapshot file: the snapshot (without the old cluster's members, which the
    new node's flags give) and a log that starts right after it. Refuses a damaged file or a used dir."""
    from spina_fast.raft.snapshots import read_snapshot

    meta, data = read_snapshot(source)
    _seed_data_dir(data_dir, meta.index, meta.term, data)
    return meta.index, meta.term


def _check_empty(data_dir: Path) -> None:
    raft_dir = data_dir / "raft"
    if raft_dir.exists() and any(raft_dir.iterdir()):
        raise InvalidRequest(f"{raft_dir} already holds Raft data; restore only into an empty data dir")


def _seed_data_dir(data_dir: Path, index: int, term: int, data: bytes) -> None:
    from spina_fast.raft.snapshots import SnapshotStore
    from spina_fast.raft.storage import RaftStorage

    _check_empty(data_dir)
    raft_dir = data_dir / "raft"
    store = SnapshotStore(raft_dir)
    store.write(index, term, None, data)
    storage = RaftStorage.open(raft_dir)
    try:
        storage.write((term, "", index), [])
        storage.compact(index, term, discard_log=True)
    finally:
        storage.close()


def _time_text(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}Z"


def _inspect_backup(directories: list[Path]) -> int:
    from spina_fast.raft.backup import scan_backup

    summary = scan_backup(directories).summary()
    for stream in summary["streams"]:
        print(f"stream {stream['directory']}: {stream['segments']} segments, indexes {stream['first_index']}.."
              f"{stream['last_index']}, bases at {stream['bases'] or '-'}, last sealed "
              f"{_time_text(stream['last_sealed'])}, seal delay median {stream['seal_delay_median']}s "
              f"max {stream['seal_delay_max']}s (achieved RPO)")
    restorable, times = summary["restorable"], summary["restorable_times"]
    if restorable is None:
        print("valid, but nothing restorable: no base snapshot and the records do not start at index 1")
    else:
        print(f"valid; restorable to indexes {restorable[0]}..{restorable[1]} (committed {_time_text(times[0])} .. "
              f"{_time_text(times[1])}); indexes held: "
              + ", ".join(f"{start}..{end}" for start, end in summary["runs"]))
    return 0


def _restore_backup(args: argparse.Namespace) -> int:
    from spina_fast.raft.backup import parse_time, scan_backup

    _check_empty(args.data_dir)  # before the work, and again before writing
    to_time = parse_time(args.to_time) if args.to_time is not None else None
    started = time.monotonic()
    backup = scan_backup(args.from_backup)
    target = backup.resolve_target(args.to_index, to_time)
    rebuilt = backup.rebuild(target)
    _seed_data_dir(args.data_dir, rebuilt.index, rebuilt.term, rebuilt.data)
    print(f"restored {', '.join(map(str, backup.streams))} into {args.data_dir}: index {rebuilt.index}, term "
          f"{rebuilt.term}, committed {_time_text(rebuilt.commit_time)}; base at {rebuilt.base_index} + "
          f"{rebuilt.replayed} entries replayed in {time.monotonic() - started:.2f}s; state hash {rebuilt.state_hash}")
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    from spina_fast.raft.snapshots import verify_snapshot_file

    command = args.snapshot_command
    if command == "save":
        return _save(args)
    if command in ("inspect", "restore") and (args.file is None) == (args.from_backup is None):
        raise InvalidRequest(f"snapshot {command}: give a snapshot FILE or --from-backup DIR (one of them)")
    if command == "restore" and args.file is not None and (args.to_index or args.to_time):
        raise InvalidRequest("--to-index and --to-time need --from-backup (a snapshot file holds one index)")
    if command == "inspect" and args.from_backup:
        return _inspect_backup(args.from_backup)
    if command == "restore" and args.from_backup:
        return _restore_backup(args)
    if command == "inspect":
        meta = verify_snapshot_file(args.file)
        members = ", ".join(sorted(meta.config.voters)) if meta.config is not None else "(from the node's flags)"
        print(f"{args.file}: valid; index {meta.index}, term {meta.term}, {meta.data_length} bytes of state, "
              f"voters {members}, taken {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(meta.created))}")
        return 0
    index, term = restore_snapshot(args.file, args.data_dir)
    print(f"restored {args.file} into {args.data_dir}: index {index}, term {term}")
    return 0
