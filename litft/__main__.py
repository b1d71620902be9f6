from litft.cli import main

main()
