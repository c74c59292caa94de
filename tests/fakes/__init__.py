"""Test doubles for lm-gateway's upstreams: real servers on loopback that can be scripted."""
