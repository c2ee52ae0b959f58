"""Does a second event-loop thread help inside one process?  (Session 9; not a test.)

A minimal asyncio SMTP responder (a Protocol that answers every command
after WORK iterations of Python work, keeps nothing) on THREADS event loops,
each in its own thread with its own listening socket on the same port
(SO_REUSEPORT).  Drive it with smtp-source and compare one loop with two:

    python3 bench/harness/gil_loops.py 1 15999 & pid=$!; sleep 1
    time smtp-source -s 20 -m 20000 -l 2000 -f a@b.test -t c@d.test 127.0.0.1:15999
    awk '{print ($14+$15)/100 " s CPU"}' /proc/$pid/stat; kill $pid
    # then the same with 2 instead of 1 (optional third argument: sys.setswitchinterval)

Measured on the 2-core build machine (docs/performance.md, "Session 9"):
one loop 3211-3289 msgs/s, two loops 1620-1709 msgs/s with twice the CPU
(1769-1772 with a switch interval of 0.1 or 50 ms).  CPU from /proc assumes 100 ticks/s.
"""
import asyncio
import os
import socket
import sys
import threading

WORK = int(os.environ.get("WORK", "300"))


def work(n: int = WORK) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


class Responder(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf, self.in_data = transport, b"", False
        work()
        transport.write(b"220 gil-loops ESMTP\r\n")

    def data_received(self, data):
        self.buf += data
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buf, self.in_data = self.buf[end + 5:], False
                work()
                out.append(b"250 ok\r\n")
                continue
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                break
            line, self.buf = self.buf[:eol].upper(), self.buf[eol + 2:]
            work()
            if line.startswith(b"DATA"):
                self.in_data = True
                out.append(b"354 go\r\n")
            elif line.startswith(b"QUIT"):
                self.transport.write(b"".join(out) + b"221 bye\r\n")
                self.transport.close()
                return
            elif line.startswith(b"EHLO"):
                out.append(b"250-gil-loops\r\n250 PIPELINING\r\n")
            else:
                out.append(b"250 ok\r\n")
        if out:
            self.transport.write(b"".join(out))


def serve(port: int) -> None:
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # loopback only
    sock.listen(1024)
    loop.run_until_complete(loop.create_server(Responder, sock=sock))
    loop.run_forever()


def main() -> None:
    threads, port = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        sys.setswitchinterval(float(sys.argv[3]))
    for _ in range(threads):
        threading.Thread(target=serve, args=(port,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
