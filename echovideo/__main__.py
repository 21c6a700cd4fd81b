from echovideo.cli import main

main()
