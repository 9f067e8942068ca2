"""A TCP proxy that holds every chunk a client sends for a while before passing it on.

`python3 -m bench_lib.latency LISTEN_PORT TARGET_PORT DELAY_MS` (from scripts/): each request
to an S3 endpoint on this machine then takes at least DELAY_MS more, as one to a store across
a network does (a PUT's headers and body may arrive as two chunks: up to twice that). Answers
come back undelayed. For `scripts/bench --store s3 --agents ... --s3-latency-ms N`: many
agents' requests are then in flight at once only if the mount sends them so.
"""

import asyncio
import sys


async def pipe(reader, writer, delay: float) -> None:
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def serve(listen: int, target: int, delay: float) -> None:
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, 0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen, target, delay_ms / 1000))
