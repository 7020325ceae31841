"""The harness of tests/e2e/test_hostile.py: hostile requests to every RPC, and what their
answers and the database must satisfy.

- `contract`: the statuses and limits of the contract, shared by what draws and what judges;
- `strategies`: Hypothesis strategies for hostile text, ids, numbers, Structs and definitions;
- `world`: the agents, definitions, runs and held assignments the requests are aimed at;
- `rpcs`: one strategy of hostile requests per RPC, drawn against a world;
- `oracle`: which requests the contract refuses, and the judge of each answer;
- `properties`: sending one request over a synchronous channel, and the Hypothesis property;
- `rules`: one fixed request per rule of the contract, so that no rule is left to chance;
- `serving`: the server still serves, and a normal flow still works, after the examples;
- `database`: the stored-data invariants checked after the examples.
"""
