"""Experiments built on the library, runnable offline in minutes: the demo (``prlhf demo``: P-DPO
against vanilla DPO on synthetic conflicting preferences), the reward demo (``prlhf rm demo``) and
the cold-start curves of new users (``cold_start``)."""
