from reverse_proxy.cli import main

main()
