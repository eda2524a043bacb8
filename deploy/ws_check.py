#!/usr/bin/env python3
"""A minimal WebSocket (RFC 6455) client for checking a Herald deployment, standard library only.

deploy/check runs it through nginx in front of a real Herald node; it works against any Herald URL
(ws:// or wss://). Progress goes to stderr; the only thing written to stdout is the id of the
notification received in `session` mode.

  ws_check.py session --url ws://HOST:PORT/v1/ws --token DEVICE_TOKEN --expect-payload JSON \
                      [--device-id ID] [--ready-file FILE] [--idle SECONDS] [--timeout SECONDS]
      Opens a session with the token in the Authorization header, checks the `hello` frame, sends
      {"type":"ping"} and expects {"type":"pong"}, stays idle for --idle seconds answering the
      server's heartbeat pings (the session must stay up), then creates --ready-file and waits for
      a notification whose payload equals --expect-payload; prints its id, acks it, and closes
      the session with 1000 (expecting the server's close frame back).

  ws_check.py hold --url ws://HOST:PORT/v1/ws --token DEVICE_TOKEN --expect-close CODE \
                   [--device-id ID] [--ready-file FILE] [--timeout SECONDS]
      Opens a session with the token in the query string (`?token=`, as browsers do), checks the
      `hello` frame, creates --ready-file, then waits for the server to close the session and
      checks the close code (e.g. 1001 when Herald shuts down).

Exit status: 0 when every check passed, 1 with a message on stderr otherwise.
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from urllib.parse import quote, urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class CheckFailed(Exception):
    pass


class Timeout(Exception):
    pass


def log(msg):
    print("ws_check: " + msg, file=sys.stderr, flush=True)


class WebSocket:
    """One client connection: masked frames out, unmasked frames in, pings answered."""

    def __init__(self, url, token=None, query_token=False, timeout=10.0):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise CheckFailed("URL must start with ws:// or wss://: " + url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if token is not None and query_token:
            path += ("&" if "?" in path else "?") + "token=" + quote(token, safe="")

        self.buf = b""
        self.server_pings = 0
        self.closed = False
        sock = socket.create_connection((host, port), timeout=timeout)
        if parts.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock = sock

        key = base64.b64encode(os.urandom(16)).decode()
        host_header = host if parts.port is None else "%s:%d" % (host, port)
        if ":" in host and not host.startswith("["):
            host_header = "[%s]:%d" % (host, port)
        lines = [
            "GET %s HTTP/1.1" % path,
            "Host: " + host_header,
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: " + key,
            "Sec-WebSocket-Version: 13",
            "User-Agent: herald-ws-check",
        ]
        if token is not None and not query_token:
            lines.append("Authorization: Bearer " + token)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline, "the handshake answer")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = status_line.split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            body = self.buf
            try:
                sock.settimeout(1.0)
                body += sock.recv(4096)
            except (OSError, socket.timeout):
                pass
            raise CheckFailed(
                "handshake refused: %r, body %r" % (status_line, body[:500].decode("utf-8", "replace"))
            )
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise CheckFailed("bad Sec-WebSocket-Accept: %r" % headers.get("sec-websocket-accept"))
        if headers.get("upgrade", "").lower() != "websocket":
            raise CheckFailed("handshake answer lacks Upgrade: websocket (%r)" % headers.get("upgrade"))
        if "upgrade" not in headers.get("connection", "").lower():
            raise CheckFailed("handshake answer lacks Connection: upgrade (%r)" % headers.get("connection"))

    def _fill(self, deadline, what):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout("timed out waiting for " + what)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Timeout("timed out waiting for " + what)
        if not data:
            raise CheckFailed("the connection ended (no close frame) while waiting for " + what)
        self.buf += data

    def _parse_frame(self):
        """One complete frame from the buffer, or None if more bytes are needed."""
        if len(self.buf) < 2:
            return None
        b0, b1 = self.buf[0], self.buf[1]
        if b0 & 0x70:
            raise CheckFailed("server frame has RSV bits set: 0x%02x" % b0)
        if b1 & 0x80:
            raise CheckFailed("server frame is masked (RFC 6455 forbids it)")
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            if len(self.buf) < 4:
                return None
            (length,) = struct.unpack("!H", self.buf[2:4])
            offset = 4
        elif length == 127:
            if len(self.buf) < 10:
                return None
            (length,) = struct.unpack("!Q", self.buf[2:10])
            offset = 10
        if len(self.buf) < offset + length:
            return None
        payload = self.buf[offset : offset + length]
        self.buf = self.buf[offset + length :]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def send(self, opcode, payload=b""):
        if isinstance(payload, str):
            payload = payload.encode()
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, value):
        self.send(OP_TEXT, json.dumps(value, separators=(",", ":")))

    def recv(self, deadline, what):
        """The next data message or close frame as (opcode, payload); pings are answered."""
        fragments, first_opcode = [], None
        while True:
            frame = self._parse_frame()
            if frame is None:
                self._fill(deadline, what)
                continue
            fin, opcode, payload = frame
            if opcode == OP_PING:
                self.server_pings += 1
                self.send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                return OP_CLOSE, payload
            if opcode == OP_CONT:
                if first_opcode is None:
                    raise CheckFailed("continuation frame without a first fragment")
            else:
                if first_opcode is not None:
                    raise CheckFailed("new data frame inside a fragmented message")
                first_opcode = opcode
            fragments.append(payload)
            if fin:
                return first_opcode, b"".join(fragments)

    def recv_json(self, deadline, what):
        opcode, payload = self.recv(deadline, what)
        if opcode == OP_CLOSE:
            code, reason = close_code(payload)
            raise CheckFailed("session closed with %s %r while waiting for %s" % (code, reason, what))
        if opcode != OP_TEXT:
            raise CheckFailed("expected a text frame while waiting for %s, got opcode %d" % (what, opcode))
        try:
            value = json.loads(payload.decode("utf-8"))
        except ValueError:
            raise CheckFailed("not JSON while waiting for %s: %r" % (what, payload[:200]))
        if not isinstance(value, dict) or "type" not in value:
            raise CheckFailed("a frame without a type while waiting for %s: %r" % (what, value))
        return value

    def close(self, code=1000, timeout=5.0):
        """Sends a close frame and waits for the server's; returns the server's close code."""
        self.send(OP_CLOSE, struct.pack("!H", code))
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv(deadline, "the server's close frame")
            if opcode == OP_CLOSE:
                return close_code(payload)[0]

    def shutdown(self):
        try:
            self.sock.close()
        except OSError:
            pass


def close_code(payload):
    if len(payload) >= 2:
        return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")
    return 1005, ""  # no status code in the close frame


def touch(path):
    if path:
        with open(path, "w") as f:
            f.write("ready\n")


def expect_hello(ws, deadline, device_id=None):
    hello = ws.recv_json(deadline, "the hello frame")
    if hello.get("type") != "hello":
        raise CheckFailed("first frame is not hello: %r" % hello)
    for field in ("session_id", "device_id", "user_id", "heartbeat_interval_ms"):
        if field not in hello:
            raise CheckFailed("hello lacks %s: %r" % (field, hello))
    if device_id is not None and hello["device_id"] != device_id:
        raise CheckFailed("hello is for device %r, expected %r" % (hello["device_id"], device_id))
    log(
        "hello: device %s of user %s, heartbeat every %s ms"
        % (hello["device_id"], hello["user_id"], hello["heartbeat_interval_ms"])
    )
    return hello


def run_session(args):
    expected_payload = json.loads(args.expect_payload)
    ws = WebSocket(args.url, args.token, query_token=False, timeout=args.timeout)
    try:
        log("connected to %s (token in the Authorization header)" % args.url)
        hello = expect_hello(ws, time.monotonic() + args.timeout, args.device_id)

        ws.send_json({"type": "ping"})
        pong = ws.recv_json(time.monotonic() + args.timeout, "the pong")
        if pong != {"type": "pong"}:
            raise CheckFailed('expected {"type":"pong"}, got %r' % pong)
        log('{"type":"ping"} answered with {"type":"pong"}')

        if args.idle > 0:
            end = time.monotonic() + args.idle
            while True:
                try:
                    frame = ws.recv_json(end, "nothing (idle)")
                except Timeout:
                    break
                raise CheckFailed("unexpected frame while idle: %r" % frame)
            interval_s = hello["heartbeat_interval_ms"] / 1000.0
            if args.idle > interval_s and ws.server_pings == 0:
                raise CheckFailed(
                    "idle for %.1f s with a %.1f s heartbeat but no server ping arrived"
                    % (args.idle, interval_s)
                )
            ws.send_json({"type": "ping"})
            pong = ws.recv_json(time.monotonic() + args.timeout, "the pong after the idle time")
            if pong != {"type": "pong"}:
                raise CheckFailed('expected {"type":"pong"} after idling, got %r' % pong)
            log(
                "stayed up while idle for %.1f s (%d server heartbeat ping(s) answered)"
                % (args.idle, ws.server_pings)
            )

        touch(args.ready_file)
        log("waiting for the notification")
        note = ws.recv_json(time.monotonic() + args.timeout, "the notification")
        if note.get("type") != "notification":
            raise CheckFailed("expected a notification, got %r" % note)
        if note.get("payload") != expected_payload:
            raise CheckFailed(
                "notification payload %r differs from the expected %r" % (note.get("payload"), expected_payload)
            )
        for field in ("id", "created_at", "expires_at"):
            if field not in note:
                raise CheckFailed("notification lacks %s: %r" % (field, note))
        log("notification %s received with the expected payload" % note["id"])
        ws.send_json({"type": "ack", "ids": [note["id"]]})
        log("acked it")

        code = ws.close(1000, timeout=args.timeout)
        if code != 1000:
            raise CheckFailed("the server answered our close 1000 with %s" % code)
        log("closed with 1000, server answered 1000")
        print(note["id"], flush=True)
    finally:
        ws.shutdown()


def run_hold(args):
    ws = WebSocket(args.url, args.token, query_token=True, timeout=args.timeout)
    try:
        log("connected to %s (token in the query string)" % args.url)
        expect_hello(ws, time.monotonic() + args.timeout, args.device_id)
        touch(args.ready_file)
        log("holding the session until the server closes it")
        deadline = time.monotonic() + args.timeout
        while True:
            opcode, payload = ws.recv(deadline, "the server to close the session")
            if opcode == OP_CLOSE:
                code, reason = close_code(payload)
                break
        try:
            ws.send(OP_CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        if code != args.expect_close:
            raise CheckFailed("session closed with %s %r, expected %d" % (code, reason, args.expect_close))
        log("server closed the session with %d %r" % (code, reason))
    finally:
        ws.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("session", "hold"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="ws://HOST:PORT/v1/ws or wss://…")
        p.add_argument("--token", required=True, help="a device token")
        p.add_argument("--device-id", help="the device id the hello frame must name")
        p.add_argument("--ready-file", help="created once the session is ready for the next step")
        p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for each step")
        if name == "session":
            p.add_argument("--expect-payload", required=True, help="JSON the notification's payload must equal")
            p.add_argument("--idle", type=float, default=0.0, help="seconds to stay idle before the notification")
        else:
            p.add_argument("--expect-close", type=int, required=True, help="the close code the server must send")
    args = parser.parse_args()
    try:
        if args.mode == "session":
            run_session(args)
        else:
            run_hold(args)
    except (CheckFailed, Timeout) as e:
        log("FAILED: %s" % e)
        return 1
    except OSError as e:
        log("FAILED: %s: %s" % (type(e).__name__, e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
