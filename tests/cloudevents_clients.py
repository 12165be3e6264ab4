"""Clients someone else wrote, against a live ingestd, for the integration
tests (tests/it/cloudevents.rs):

  send URL TRACEPARENT   the official CloudEvents SDK (the `cloudevents`
                         package) serialises events in binary, structured
                         and batched mode; urllib posts them, then posts
                         each again (a replay). Prints one JSON line per
                         request: mode, status, response body, and the
                         event's source and id.
  read AMQP_URL QUEUE N  pika takes N messages from QUEUE (acking them) and
                         prints each one's properties and headers as a JSON
                         line.
"""

import json
import sys
import urllib.error
import urllib.request

# Straight to the server, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url, headers, body):
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def send(url, traceparent):
    from cloudevents.core.bindings import http
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    fmt = JSONFormat()
    source = "/tests/sdk"

    def event(id_, data, **extra):
        attributes = {"specversion": "1.0", "id": id_, "source": source,
                      "type": "com.example.sdk", "subject": "s-" + id_}
        attributes.update(extra)
        return CloudEvent(attributes, data)

    requests = []
    # Binary mode: attributes in ce-* headers, the data is the body; the
    # request's traceparent header carries the trace.
    binary = http.to_binary(event("bin-1", {"mode": "binary", "n": 1},
                                  partitionkey="pk-1"), fmt)
    headers = dict(binary.headers)
    headers["traceparent"] = traceparent
    headers.setdefault("content-type", "application/json")
    requests.append(("binary", headers, binary.body, ["bin-1"]))
    # Binary data in binary mode, kept as base64.
    raw = http.to_binary(event("bin-2", b"\x00\x01binary",
                               datacontenttype="application/octet-stream"), fmt)
    requests.append(("binary-bytes", dict(raw.headers), raw.body, ["bin-2"]))
    # Structured mode: one event as a JSON object.
    structured = http.to_structured(event("str-1", {"mode": "structured"},
                                          myext="x-1"), fmt)
    requests.append(("structured", dict(structured.headers), structured.body, ["str-1"]))
    # Batched mode: the SDK's JSON format for each event, in one array.
    items = [event("bat-%d" % i, {"mode": "batched", "i": i}) for i in range(3)]
    body = b"[" + b",".join(fmt.write(e) for e in items) + b"]"
    requests.append(("batched", {"content-type": "application/cloudevents-batch+json"},
                     body, ["bat-0", "bat-1", "bat-2"]))

    for attempt in ("first", "replay"):
        for mode, headers, body, ids in requests:
            status, answer = post(url, headers, body)
            print(json.dumps({"mode": mode, "attempt": attempt, "status": status,
                              "answer": answer, "source": source, "ids": ids}))


def read(amqp_url, queue, count):
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    got = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=10):
        if method is None:
            break
        headers = {k: (v.decode() if isinstance(v, bytes) else v)
                   for k, v in (properties.headers or {}).items()}
        print(json.dumps({"message_id": properties.message_id,
                          "content_type": properties.content_type,
                          "delivery_mode": properties.delivery_mode,
                          "type": properties.type,
                          "headers": headers,
                          "body": json.loads(body) if body else None}))
        channel.basic_ack(method.delivery_tag)
        got += 1
        if got == count:
            break
    channel.cancel()
    connection.close()


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "read":
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: send URL TRACEPARENT | read AMQP_URL QUEUE N")
