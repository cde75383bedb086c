"""The planners: each turns a plan spec (`fora:3`, `l2c:2`, `tokencache:2`, ...) into a Plan.

`fixed` (full, fora, taylor: no learning), `l2c` (Learning-to-Cache) and `l2c_import` (its
published routers), `tokencache` (TokenCache and its dynamic variant), `combined`
(tokencache+l2c). `tcgraph.plan.registry` maps spec names to them; what the learned ones
share lives in `tcgraph.plan.learning.common`.
"""
