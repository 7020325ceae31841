"""The engine's rules over time, without a server or a database: `memory` is a `Persistence` in
plain dicts, `harness` runs the engine on it with a virtual clock, and the tests drive it."""
