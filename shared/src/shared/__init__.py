"""What both services share: settings, the message contract, the topology, storage."""
