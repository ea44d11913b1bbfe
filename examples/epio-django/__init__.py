# the project is a package named by [checkout] directory_name (guestbook)
