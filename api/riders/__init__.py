"""Riders: accounts, sessions and rides — who may ride which bike, and the ride's life around its unlock and lock.

Owns user accounts and sign-up/login (`users`, `user_routes`), sessions and their revocation (`sessions`), rides
(`rides`: start with an unlock, end with a lock; `ride_routes`), the rider tables (`models`), and the search for
bikes near a rider (`nearby_routes`).

May import: commands (a ride's unlock and lock are commands), the device registry, push (events), the API's
ground and foundation/.
"""
