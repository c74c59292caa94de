"""Resilience: guards around every connection (retries, cooldowns, the attempt log) and
strategies made of connections (fallback chains, load balancing, hedging). See
doc/resilience.md."""

from __future__ import annotations

from .guard import ConnectionCoolingDown, Cooldown, Guard, guard
from .strategy import StrategyProvider

#: lm-proxy's name; its configs are read by the config schema into a strategy connection.
Fallback = StrategyProvider

__all__ = ["ConnectionCoolingDown", "Cooldown", "Fallback", "Guard", "StrategyProvider", "guard"]
