from catalyst_proxy.cli import main

main()
