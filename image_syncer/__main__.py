from image_syncer.cli import main

main()
