from cocoon_faas.cli import main

main()
