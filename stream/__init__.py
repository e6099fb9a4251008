"""Streaming runtime and websocket server (builds on causvid).

    protocol   validated client messages, events, the binary frame format (docs/protocol.md)
    state      one stream's model state: rollout, prompt, i2v prefill, v2v input, decoding
    batching   denoising several streams' blocks in one forward pass
    session    one stream on the event loop: controls, bounded outbox, pacing clock
    engine     the shared model thread and the loop that schedules blocks onto it
    server     connections, HTTP (page, /healthz), auth, origin checks, limits
    client     a Python client and the recorder behind `causvid client`
    bench      `causvid bench stream`
    web/       the browser page
"""
