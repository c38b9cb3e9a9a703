"""Fleet rollouts: one command to many locks by tag or list, in waves, paced behind riders' own commands.

Owns the rollout service (`service`), its tables (`models`) and routes (`routes`: /v1/fleet/...). May import:
commands, the device registry, push (events), the API's ground and foundation/.
"""
