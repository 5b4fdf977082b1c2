"""Calls: aiortc shell, media tracks, hybrid SRTP hook."""
