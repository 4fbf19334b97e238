"""Throughput probe for the lab tests: ``serve ADDRESS`` prints its port, then the Mbit/s it received;
``send ADDRESS PORT SECONDS`` sends as fast as the link allows."""

import socket
import sys
import time

mode = sys.argv[1]
if mode == "serve":
    server = socket.socket()
    server.bind((sys.argv[2], 0))
    server.listen(1)
    print(server.getsockname()[1], flush=True)
    connection, _ = server.accept()
    total, start = 0, None
    while True:
        data = connection.recv(1 << 16)
        if not data:
            break
        start = start or time.monotonic()
        total += len(data)
    print(total * 8 / (time.monotonic() - start) / 1e6, flush=True)
else:
    connection = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
    end, chunk = time.monotonic() + float(sys.argv[4]), b"x" * (1 << 16)
    while time.monotonic() < end:
        connection.sendall(chunk)
    connection.close()
