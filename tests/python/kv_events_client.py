"""A KV-event subscriber written the way llm-d's vLLM adapter decodes (pyzmq + plain msgpack, by
position), for tests/kv_events.rs.

    python kv_events_client.py subscribe ENDPOINT OUT   # SUB to `kv@`, one JSON line per message
    python kv_events_client.py replay ENDPOINT START    # DEALER: ask for batches from START, print them
"""
import json
import sys

import msgpack
import zmq


def decode(seq_b, payload):
    ts, events, *rest = msgpack.unpackb(payload, raw=False)
    out = []
    for ev in events:
        kind = ev[0]
        if kind == "BlockStored":
            out.append({"type": kind, "block_hashes": ev[1], "parent_block_hash": ev[2], "token_ids": ev[3],
                        "block_size": ev[4], "lora_id": ev[5], "medium": ev[6],
                        "extra_keys": ev[8] if len(ev) > 8 else None})
        elif kind == "BlockRemoved":
            out.append({"type": kind, "block_hashes": ev[1], "medium": ev[2] if len(ev) > 2 else None})
        else:
            out.append({"type": kind})
    assert len(seq_b) == 8
    return {"seq": int.from_bytes(seq_b, "big"), "ts": ts, "dp_rank": rest[0] if rest else None, "events": out}


def subscribe(endpoint, path):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv@")
    sub.connect(endpoint)
    print("ready", flush=True)
    with open(path, "a") as f:
        while True:
            frames = sub.recv_multipart()
            assert len(frames) == 3, len(frames)
            topic, seq_b, payload = frames
            msg = decode(seq_b, payload)
            msg["topic"] = topic.decode()
            f.write(json.dumps(msg) + "\n")
            f.flush()


def replay(endpoint, start):
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10000)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", int(start).to_bytes(8, "big")])
    while True:
        empty, seq_b, payload = dealer.recv_multipart()
        assert empty == b""
        if seq_b == b"\xff" * 8:
            assert payload == b""
            break
        print(json.dumps(decode(seq_b, payload)), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "subscribe":
        subscribe(sys.argv[2], sys.argv[3])
    else:
        replay(sys.argv[2], sys.argv[3])
