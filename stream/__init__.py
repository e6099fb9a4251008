"""Streaming runtime and websocket server (builds on causvid)."""
