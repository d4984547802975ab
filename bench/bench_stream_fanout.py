"""One change fanned out to N node-locals: how long from the central's publish until every
long-polling follower has its delta, and what the waiting costs the central.

An in-process central (Publisher, ImageStream, the HTTP listener kdns uses) publishes an
image of --services Services; a client process holds N long-polls (asyncio, raw HTTP/1.0,
as kdns/nodelocal/source.py asks) with the current ETag; then one Service is added and
published, and the clients report when each delta arrived.

    .venv/bin/python bench/bench_stream_fanout.py --followers 1000 --services 1000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


async def follower(port, etag, results):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /image?wait=120 HTTP/1.0\r\nIf-None-Match: {etag}\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    results.append((time.time(), len(data), b"X-Kdns-Transfer: delta" in data))
    w.close()


async def clients(port, etag, n):
    results = []
    tasks = [asyncio.create_task(follower(port, etag, results)) for _ in range(n)]
    print("WAITING", flush=True)
    await asyncio.gather(*tasks)
    return results


def client_main(port, etag, n):
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, n + 100))
    results = asyncio.run(clients(port, etag, n))
    print(json.dumps(results), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--followers", type=int, default=1000, help="at least 1")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.client:
        return client_main(int(a.client[0]), a.client[1], int(a.client[2]))
    from bench_stream import add_service, cluster, compile_items
    from kdns.serve.stream import ImageStream, etag_of
    from kdns.observe.http import HttpListener
    from kdns.serve.publish import Publisher
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.followers + 200), hard))
    base = compile_items(cluster(a.services, 10, 5), serial=1)
    nxt = compile_items(cluster(a.services, 10, 5, [add_service(a.services)]), serial=2)
    pub = Publisher()
    stream = ImageStream(pub)
    listener = HttpListener("127.0.0.1", 0, stream.routes())
    listener.server.request_queue_size = a.followers
    listener.start()
    port = listener.server.server_address[1]
    pub.publish(base)
    with stream.cond:
        stream.cond.wait_for(lambda: stream.current is not None, 30)
    etag = etag_of(base)
    proc = subprocess.Popen([sys.executable, __file__, "--client", str(port), etag,
                             str(a.followers)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WAITING"
    import threading
    while threading.active_count() < a.followers + 3:       # every long-poll is waiting
        time.sleep(0.05)
    rss_waiting = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    t0 = time.time()
    pub.publish(nxt)
    results = json.loads(proc.stdout.readline())
    proc.wait()
    done = sorted(t - t0 for t, _, _ in results)
    out = {"followers": a.followers, "services": a.services,
           "deltas": sum(1 for *_, d in results if d),
           "response_bytes": results[0][1],
           "first_s": round(done[0], 3), "median_s": round(done[len(done) // 2], 3),
           "last_s": round(done[-1], 3),
           "threads_waiting": a.followers, "central_rss_kib_waiting": rss_waiting}
    print(json.dumps(out))
    listener.close()
    pub.close()
    return out


if __name__ == "__main__":
    main()
