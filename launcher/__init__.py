"""Driver side of jaxlaunch: configuration, Ray worker groups, the control loop, run records."""
