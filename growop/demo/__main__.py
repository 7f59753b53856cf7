from growop.demo import main

main()
